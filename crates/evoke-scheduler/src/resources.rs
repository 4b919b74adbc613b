//! Resource quantities ("100m", "1.5", "512Mi", "2G") and what a pod asks for.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// A quantity that could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid quantity {0:?}")]
pub struct QuantityError(pub String);

/// Parses a Kubernetes quantity into thousandths of its unit ("milli"), so
/// that CPU ("250m") and bytes ("1Gi") share one exact integer form.
pub fn parse_milli(q: &str) -> Result<i128, QuantityError> {
    let err = || QuantityError(q.to_string());
    let s = q.trim();
    if s.is_empty() {
        return Err(err());
    }
    // Split the numeric part from the suffix.
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(end);
    if num.is_empty() {
        return Err(err());
    }
    // Decimal exponent suffix: "1e3", "1E3".
    let (mult_num, mult_den): (i128, i128) = match suffix {
        "" => (1000, 1),
        "m" => (1, 1),
        "u" => (1, 1000),
        "n" => (1, 1_000_000),
        "k" => (1000 * 1000, 1),
        "M" => (1000 * 1_000_000, 1),
        "G" => (1000 * 1_000_000_000, 1),
        "T" => (1000 * 1_000_000_000_000, 1),
        "P" => (1000 * 1_000_000_000_000_000, 1),
        "E" => (1000 * 1_000_000_000_000_000_000, 1),
        "Ki" => (1000 << 10, 1),
        "Mi" => (1000 << 20, 1),
        "Gi" => (1000 << 30, 1),
        "Ti" => (1000 << 40, 1),
        "Pi" => (1000 << 50, 1),
        "Ei" => (1000 << 60, 1),
        s if s.starts_with(['e', 'E']) => {
            let exp: u32 = s[1..].parse().map_err(|_| err())?;
            if exp > 18 {
                return Err(err());
            }
            (1000 * 10i128.pow(exp), 1)
        }
        _ => return Err(err()),
    };
    let (neg, digits) = match num.as_bytes()[0] {
        b'-' => (true, &num[1..]),
        b'+' => (false, &num[1..]),
        _ => (false, num),
    };
    let (int_part, frac_part) = match digits.split_once('.') {
        Some((i, f)) => (i, f),
        None => (digits, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(err());
    }
    if !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(err());
    }
    let frac_part = &frac_part[..frac_part.len().min(18)];
    let int: i128 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| err())?
    };
    let frac: i128 = if frac_part.is_empty() {
        0
    } else {
        frac_part.parse().map_err(|_| err())?
    };
    let frac_den = 10i128.pow(frac_part.len() as u32);
    // value = (int + frac/frac_den) * mult_num / mult_den, rounded up as Kubernetes does.
    let numer = (int * frac_den + frac)
        .checked_mul(mult_num)
        .ok_or_else(err)?;
    let denom = frac_den * mult_den;
    let v = (numer + denom - 1) / denom;
    Ok(if neg { -v } else { v })
}

/// CPU in millicores; an unparsable value counts as zero.
pub fn cpu_milli(q: &Quantity) -> i64 {
    parse_milli(&q.0).map(|v| v as i64).unwrap_or(0)
}

/// Bytes (or any plain count), rounded up.
pub fn value(q: &Quantity) -> i64 {
    parse_milli(&q.0)
        .map(|v| ((v + 999) / 1000) as i64)
        .unwrap_or(0)
}

/// What a pod or a node offers or asks for, in the units the scheduler compares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_milli: i64,
    pub memory: i64,
    pub pods: i64,
}

impl Resources {
    pub fn add(&mut self, o: &Resources) {
        self.cpu_milli += o.cpu_milli;
        self.memory += o.memory;
        self.pods += o.pods;
    }
    pub fn sub(&mut self, o: &Resources) {
        self.cpu_milli -= o.cpu_milli;
        self.memory -= o.memory;
        self.pods -= o.pods;
    }
    /// Reads `cpu`, `memory` and `pods` from a resource list.
    pub fn from_list(list: Option<&BTreeMap<String, Quantity>>) -> Resources {
        let mut r = Resources::default();
        if let Some(list) = list {
            if let Some(q) = list.get("cpu") {
                r.cpu_milli = cpu_milli(q);
            }
            if let Some(q) = list.get("memory") {
                r.memory = value(q);
            }
            if let Some(q) = list.get("pods") {
                r.pods = value(q);
            }
        }
        r
    }
}

fn container_requests(c: &Container) -> Resources {
    let res = c.resources.as_ref();
    // A limit without a request means request = limit, as the API server defaults it.
    let mut r = Resources::from_list(res.and_then(|r| r.requests.as_ref()));
    let lim = Resources::from_list(res.and_then(|r| r.limits.as_ref()));
    if r.cpu_milli == 0 {
        r.cpu_milli = lim.cpu_milli;
    }
    if r.memory == 0 {
        r.memory = lim.memory;
    }
    r
}

/// A pod's effective request: the sum over its containers, or the largest
/// init container if that is more, plus the overhead; `pods` is 1.
pub fn pod_requests(pod: &Pod) -> Resources {
    let mut total = Resources::default();
    let Some(spec) = pod.spec.as_ref() else {
        total.pods = 1;
        return total;
    };
    for c in &spec.containers {
        total.add(&container_requests(c));
    }
    for c in spec.init_containers.iter().flatten() {
        let r = container_requests(c);
        total.cpu_milli = total.cpu_milli.max(r.cpu_milli);
        total.memory = total.memory.max(r.memory);
    }
    let overhead = Resources::from_list(spec.overhead.as_ref());
    total.cpu_milli += overhead.cpu_milli;
    total.memory += overhead.memory;
    total.pods = 1;
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_to_exact_milli_units() {
        assert_eq!(parse_milli("250m"), Ok(250));
        assert_eq!(parse_milli("1"), Ok(1000));
        assert_eq!(parse_milli("1.5"), Ok(1500));
        assert_eq!(parse_milli("0.1"), Ok(100));
        assert_eq!(parse_milli("1Ki"), Ok(1024 * 1000));
        assert_eq!(parse_milli("512Mi"), Ok(512 * 1024 * 1024 * 1000));
        assert_eq!(parse_milli("2G"), Ok(2_000_000_000 * 1000));
        assert_eq!(parse_milli("1e3"), Ok(1_000_000));
        assert_eq!(parse_milli(".5"), Ok(500));
    }

    #[test]
    fn malformed_quantities_are_errors_not_panics() {
        for bad in ["", "abc", "1Zi", "1.2.3", "m", "1e99", "--1"] {
            assert!(parse_milli(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn pod_request_is_containers_sum_or_largest_init_container() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {
                "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "2", "memory": "10Mi"}}}],
                "containers": [
                    {"name": "a", "resources": {"requests": {"cpu": "500m", "memory": "64Mi"}}},
                    {"name": "b", "resources": {"limits": {"cpu": "250m", "memory": "64Mi"}}}
                ]
            }
        }))
        .expect("valid pod");
        let r = pod_requests(&pod);
        assert_eq!(r.cpu_milli, 2000);
        assert_eq!(r.memory, 128 << 20);
        assert_eq!(r.pods, 1);
    }
}
