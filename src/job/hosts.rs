//! Limits on the calls to one endpoint host, as a job's options or the server's flags give
//! them; `engine::hosts` enforces them.

use serde::{Deserialize, Serialize};

/// The most calls in flight at once to one host: a number, or `auto`, a limit that adapts
/// to what the host's answers say (see `engine::hosts`). Written as a number or `"auto"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostConcurrency {
    Fixed(u32),
    Auto,
}

impl HostConcurrency {
    /// The fixed number, if it is one.
    pub fn fixed(self) -> Option<u32> {
        match self {
            HostConcurrency::Fixed(n) => Some(n),
            HostConcurrency::Auto => None,
        }
    }

    /// `N` (at least 1) or `auto`, as the command line and `PATCH` take it.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.eq_ignore_ascii_case("auto") {
            return Ok(HostConcurrency::Auto);
        }
        match text.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(HostConcurrency::Fixed(n)),
            _ => Err(format!(
                "{text:?} is neither a whole number of 1 or more nor auto"
            )),
        }
    }
}

impl std::fmt::Display for HostConcurrency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostConcurrency::Fixed(n) => write!(f, "{n}"),
            HostConcurrency::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for HostConcurrency {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            HostConcurrency::Fixed(n) => serializer.serialize_u32(*n),
            HostConcurrency::Auto => serializer.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for HostConcurrency {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HostConcurrency;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a whole number from 1 to 4294967295, or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                u32::try_from(v)
                    .ok()
                    .filter(|n| *n >= 1)
                    .map(HostConcurrency::Fixed)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self)),
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if v == "auto" {
                    Ok(HostConcurrency::Auto)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl utoipa::PartialSchema for HostConcurrency {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, SchemaType, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::new(Type::Integer))
                    .minimum(Some(1))
                    .maximum(Some(u32::MAX)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::new(Type::String))
                    .enum_values(Some(["auto"])),
            )
            .into()
    }
}

impl utoipa::ToSchema for HostConcurrency {}

/// Limits on the calls to one endpoint host: the server's for all jobs, or one job's own
/// (enforced by `engine::hosts`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostLimits {
    /// Most calls in flight at once: a number, or adaptive.
    pub concurrency: Option<HostConcurrency>,
    /// Most calls started per second (a bucket of one token, refilled at this rate).
    pub rate: Option<f64>,
}

impl HostLimits {
    pub const UNLIMITED: HostLimits = HostLimits {
        concurrency: None,
        rate: None,
    };

    pub fn is_unlimited(&self) -> bool {
        self.concurrency.is_none() && self.rate.is_none()
    }
}
