//! Storage policies: which points of a property are stored, and for how long.
//!
//! A policy names a product and a property (`*`: every property of the product without a policy
//! of its own). The mode decides which points land in history (the latest value is always
//! kept); the retention (`ttl`) decides when stored points are dropped: a property's own
//! retention, else its product's, else `[timeseries] ttl`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::RwLock;

/// Which points of a series are stored.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Mode {
    /// Every point.
    All,
    /// A point whose value differs from the last stored one by more than `deadband` (numbers),
    /// or at all (other values).
    OnChange {
        /// Smallest change of a number that is stored (0: any change).
        #[serde(default)]
        deadband: f64,
    },
    /// At most one point per `interval_ms` (the first one after the interval).
    Interval {
        /// Milliseconds between stored points, at least 1.
        interval_ms: i64,
    },
    /// No point (the latest value is still kept).
    None,
}

/// A policy as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Policy {
    /// Product key.
    pub product_key: String,
    /// Property identifier, or `*` for the product's default.
    pub identifier: String,
    /// What is stored.
    #[serde(flatten)]
    pub mode: Mode,
    /// Retention in ms: `null` inherits (the product's, then the server's), 0 keeps forever.
    pub ttl_ms: Option<i64>,
    /// When it was last set, ms.
    pub updated_at: i64,
}

/// Policies in memory, read by the writer for each point and by queries and the reaper.
#[derive(Debug, Default)]
pub struct Policies {
    by_key: RwLock<HashMap<(String, String), Policy>>,
    /// The server's retention, ms (0: keep forever).
    default_ttl: i64,
}

/// The last stored point of a series that has an on-change or interval policy.
#[derive(Debug, Clone)]
pub struct Kept {
    /// Its time, ms.
    pub ts: i64,
    /// Its value.
    pub value: Value,
}

impl Policies {
    /// Policies with the server's retention (`None`: forever).
    pub fn new(default_ttl: Option<std::time::Duration>) -> Self {
        Self {
            by_key: RwLock::default(),
            default_ttl: default_ttl
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        }
    }

    /// Replaces every policy (after loading them from the database).
    pub fn replace(&self, all: Vec<Policy>) {
        let map = all
            .into_iter()
            .map(|p| ((p.product_key.clone(), p.identifier.clone()), p))
            .collect();
        *self.by_key.write().unwrap_or_else(|e| e.into_inner()) = map;
    }

    /// Sets or replaces one policy.
    pub fn put(&self, p: Policy) {
        self.by_key
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert((p.product_key.clone(), p.identifier.clone()), p);
    }

    /// Removes one policy.
    pub fn remove(&self, pk: &str, identifier: &str) {
        self.by_key
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(pk.to_owned(), identifier.to_owned()));
    }

    /// Every policy of a product (all products when `None`), sorted.
    pub fn list(&self, pk: Option<&str>) -> Vec<Policy> {
        let mut v: Vec<Policy> = self
            .by_key
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|p| pk.is_none_or(|pk| p.product_key == pk))
            .cloned()
            .collect();
        v.sort_by(|a, b| (&a.product_key, &a.identifier).cmp(&(&b.product_key, &b.identifier)));
        v
    }

    /// The mode that applies to a property.
    pub fn mode(&self, pk: &str, identifier: &str) -> Mode {
        let map = self.by_key.read().unwrap_or_else(|e| e.into_inner());
        if map.is_empty() {
            return Mode::All;
        }
        map.get(&(pk.to_owned(), identifier.to_owned()))
            .or_else(|| map.get(&(pk.to_owned(), "*".to_owned())))
            .map_or(Mode::All, |p| p.mode)
    }

    /// The retention that applies to a property, ms (0: forever).
    pub fn ttl(&self, pk: &str, identifier: &str) -> i64 {
        let map = self.by_key.read().unwrap_or_else(|e| e.into_inner());
        map.get(&(pk.to_owned(), identifier.to_owned()))
            .and_then(|p| p.ttl_ms)
            .or_else(|| {
                map.get(&(pk.to_owned(), "*".to_owned()))
                    .and_then(|p| p.ttl_ms)
            })
            .unwrap_or(self.default_ttl)
    }

    /// The server's retention, ms (0: forever).
    pub fn default_ttl(&self) -> i64 {
        self.default_ttl
    }
}

impl Mode {
    /// Whether a point is stored, given the last stored point of its series (`None` when
    /// unknown: after a restart the first point is always stored).
    pub fn keeps(&self, last: Option<&Kept>, ts: i64, value: &Value) -> bool {
        match (self, last) {
            (Mode::All, _) => true,
            (Mode::None, _) => false,
            (_, None) => true,
            (Mode::Interval { interval_ms }, Some(k)) => ts.saturating_sub(k.ts) >= *interval_ms,
            (Mode::OnChange { deadband }, Some(k)) => {
                match (
                    super::codec::numeric(value),
                    super::codec::numeric(&k.value),
                ) {
                    (Some(a), Some(b)) => (a - b).abs() > *deadband,
                    _ => *value != k.value,
                }
            }
        }
    }

    /// Whether the mode needs the last stored point.
    pub fn remembers(&self) -> bool {
        matches!(self, Mode::OnChange { .. } | Mode::Interval { .. })
    }

    /// Checks the mode's numbers.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Mode::OnChange { deadband } if !(deadband.is_finite() && *deadband >= 0.0) => Err(
                format!("deadband {deadband} must be a number of at least 0"),
            ),
            Mode::Interval { interval_ms } if *interval_ms < 1 => {
                Err(format!("interval_ms {interval_ms} must be at least 1"))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kept(ts: i64, v: Value) -> Kept {
        Kept { ts, value: v }
    }

    #[test]
    fn modes_decide_which_points_are_stored() {
        let on_change = Mode::OnChange { deadband: 0.5 };
        let last = kept(1000, json!(20.0));
        assert!(on_change.keeps(None, 0, &json!(20.0)));
        assert!(!on_change.keeps(Some(&last), 2000, &json!(20.5)));
        assert!(on_change.keeps(Some(&last), 2000, &json!(20.6)));
        assert!(on_change.keeps(Some(&last), 2000, &json!(19.4)));
        let exact = Mode::OnChange { deadband: 0.0 };
        assert!(!exact.keeps(Some(&last), 2000, &json!(20)));
        assert!(exact.keeps(Some(&last), 2000, &json!(20.01)));
        assert!(exact.keeps(Some(&kept(0, json!("a"))), 1, &json!("b")));
        assert!(!exact.keeps(Some(&kept(0, json!({"a": 1}))), 1, &json!({"a": 1})));
        let every = Mode::Interval {
            interval_ms: 60_000,
        };
        assert!(!every.keeps(Some(&last), 60_999, &json!(1)));
        assert!(every.keeps(Some(&last), 61_000, &json!(1)));
        assert!(!Mode::None.keeps(None, 0, &json!(1)));
        assert!(Mode::All.keeps(Some(&last), 1000, &json!(20.0)));
    }

    #[test]
    fn a_property_policy_wins_over_its_products_and_retention_inherits() {
        let p = Policies::new(Some(std::time::Duration::from_secs(86_400)));
        assert_eq!(p.mode("pk", "temp"), Mode::All);
        assert_eq!(p.ttl("pk", "temp"), 86_400_000);
        p.put(Policy {
            product_key: "pk".into(),
            identifier: "*".into(),
            mode: Mode::Interval { interval_ms: 10 },
            ttl_ms: Some(3_600_000),
            updated_at: 0,
        });
        p.put(Policy {
            product_key: "pk".into(),
            identifier: "temp".into(),
            mode: Mode::OnChange { deadband: 1.0 },
            ttl_ms: None,
            updated_at: 0,
        });
        p.put(Policy {
            product_key: "pk".into(),
            identifier: "keep".into(),
            mode: Mode::All,
            ttl_ms: Some(0),
            updated_at: 0,
        });
        assert_eq!(p.mode("pk", "temp"), Mode::OnChange { deadband: 1.0 });
        assert_eq!(p.mode("pk", "hum"), Mode::Interval { interval_ms: 10 });
        assert_eq!(p.mode("other", "hum"), Mode::All);
        assert_eq!(p.ttl("pk", "temp"), 3_600_000);
        assert_eq!(p.ttl("pk", "keep"), 0);
        assert_eq!(p.ttl("other", "x"), 86_400_000);
        assert_eq!(p.list(Some("pk")).len(), 3);
        p.remove("pk", "*");
        assert_eq!(p.mode("pk", "hum"), Mode::All);
        assert!(Mode::OnChange { deadband: -1.0 }.validate().is_err());
        assert!(Mode::Interval { interval_ms: 0 }.validate().is_err());
    }
}
