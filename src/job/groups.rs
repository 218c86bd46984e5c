//! The limits a group of jobs shares (`options.group`, `PUT /v1/groups/{name}`): the most
//! calls of all its jobs in flight at once, and the most started per second, across every
//! node. `store::plan::GroupGate` applies them at each claim.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The rates a group accepts, in calls started per second: as for a host
/// (`PER_HOST_RATES`), from one call every 1000 s to a million a second.
pub const GROUP_RATES: std::ops::RangeInclusive<f64> = super::PER_HOST_RATES;

/// The most calls a group may have in flight, as a limit: more than any node could run.
pub const MAX_GROUP_CONCURRENCY: u32 = 1_000_000;

/// A group's own limits; `None` for no limit of that kind. Without its own `concurrency`,
/// a group has the server's `--group-concurrency`, if any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupLimits {
    /// The most calls of the group's jobs in flight at once, across every node (a task
    /// awaiting its report counts, as it does for a job's `concurrency`).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub concurrency: Option<u32>,
    /// The most calls of the group's jobs started per second, across every node; calls are
    /// spaced evenly (`1 / rate` seconds apart).
    #[serde(default)]
    #[schema(minimum = 0.001, maximum = 1_000_000)]
    pub rate: Option<f64>,
}

impl GroupLimits {
    /// What is wrong with these limits, naming the field, if anything is.
    pub fn check(&self) -> Result<(), String> {
        if let Some(c) = self.concurrency
            && !(1..=MAX_GROUP_CONCURRENCY).contains(&c)
        {
            return Err(format!(
                "concurrency: {c} is not between 1 and {MAX_GROUP_CONCURRENCY}"
            ));
        }
        if let Some(r) = self.rate
            && !GROUP_RATES.contains(&r)
        {
            return Err(format!(
                "rate: {r} is not between {} and {} calls per second",
                GROUP_RATES.start(),
                GROUP_RATES.end()
            ));
        }
        Ok(())
    }

    /// The limits a group has: its own, the server's default concurrency where it has none.
    pub fn effective(own: Option<&GroupLimits>, default_concurrency: Option<u32>) -> Self {
        GroupLimits {
            concurrency: own.and_then(|l| l.concurrency).or(default_concurrency),
            rate: own.and_then(|l| l.rate),
        }
    }

    /// Whether there is any limit at all.
    pub fn limits(&self) -> bool {
        self.concurrency.is_some() || self.rate.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked_and_defaulted() {
        let own = GroupLimits {
            concurrency: None,
            rate: Some(2.5),
        };
        assert!(own.check().is_ok());
        let bad = GroupLimits {
            concurrency: Some(0),
            rate: None,
        };
        assert!(bad.check().unwrap_err().starts_with("concurrency: 0"));
        let bad = GroupLimits {
            concurrency: None,
            rate: Some(0.0),
        };
        assert!(bad.check().unwrap_err().starts_with("rate: 0"));
        let with_default = GroupLimits::effective(Some(&own), Some(8));
        assert_eq!(with_default.concurrency, Some(8));
        assert_eq!(with_default.rate, Some(2.5));
        assert!(!GroupLimits::effective(None, None).limits());
        let body: Result<GroupLimits, _> = serde_json::from_str(r#"{"concurency": 3}"#);
        assert!(body.is_err(), "unknown fields are refused");
    }
}
