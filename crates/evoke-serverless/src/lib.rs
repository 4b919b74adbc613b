//! Serverless: activator, concurrency autoscaler, metering.
