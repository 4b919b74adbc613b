//! Pod to node scheduling: filter, score, bind.
