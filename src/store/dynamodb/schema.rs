//! The table: where it is (the `dynamodb://` URL), how `doparallel migrate` creates it, and
//! the check `serve` makes before using it.

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, IndexStatus, KeySchemaElement, KeyType,
    Projection, ProjectionType, ScalarAttributeType, TableStatus,
};

use crate::store::{StoreError, StoreResult};

/// A parsed `dynamodb://TABLE?region=REGION&endpoint=URL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub table: String,
    /// `None`: the SDK's own chain (AWS_REGION, the profile).
    pub region: Option<String>,
    /// DynamoDB Local, moto, or another endpoint than the region's own.
    pub endpoint: Option<String>,
}

impl Location {
    pub fn parse(url: &str) -> StoreResult<Self> {
        let invalid = |why: &str| {
            StoreError::Other(format!(
                "invalid DynamoDB URL {url:?}: {why} (expected dynamodb://TABLE?region=REGION[&endpoint=URL])"
            ))
        };
        let rest = url
            .strip_prefix("dynamodb://")
            .ok_or_else(|| invalid("it does not start with dynamodb://"))?;
        let (table, query) = rest.split_once('?').unwrap_or((rest, ""));
        let table = table.trim_end_matches('/');
        // DynamoDB's own rule for table names.
        if table.len() < 3
            || table.len() > 255
            || !table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(invalid(
                "the table name must be 3-255 characters of a-z, A-Z, 0-9, _, - and .",
            ));
        }
        let mut location = Location {
            table: table.to_string(),
            region: None,
            endpoint: None,
        };
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "region" => location.region = Some(value.into_owned()),
                "endpoint" => {
                    let endpoint = url::Url::parse(&value)
                        .map_err(|e| invalid(&format!("endpoint {value:?} is not a URL ({e})")))?;
                    if !matches!(endpoint.scheme(), "http" | "https") {
                        return Err(invalid("the endpoint must be an http(s) URL"));
                    }
                    location.endpoint = Some(value.into_owned());
                }
                other => return Err(invalid(&format!("unknown parameter {other:?}"))),
            }
        }
        Ok(location)
    }

    /// The URL again, as `migrate` should be given it.
    pub fn url(&self, region: &str) -> String {
        let mut url = format!("dynamodb://{}?region={region}", self.table);
        if let Some(endpoint) = &self.endpoint {
            url.push_str("&endpoint=");
            url.push_str(endpoint);
        }
        url
    }
}

/// A client for the location, with the SDK's usual credential chain (environment, profile,
/// web identity, container, instance metadata) and its region chain when the URL names none.
pub async fn client(location: &Location) -> StoreResult<(Client, String)> {
    let mut loader = crate::aws::config_loader();
    // Without a region in the URL the loader's own chain looks (AWS_REGION, the profile,
    // instance metadata), with the HTTP client above.
    if let Some(region) = &location.region {
        loader = loader.region(aws_sdk_dynamodb::config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &location.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    let config = loader.load().await;
    let region = config
        .region()
        .map(|r| r.to_string())
        .ok_or_else(|| {
            StoreError::Other(format!(
                "no AWS region for DynamoDB table {}: add ?region=REGION to the database URL or set AWS_REGION",
                location.table
            ))
        })?;
    Ok((Client::new(&config), region))
}

/// The table's global secondary indexes: name, key attributes, and the attributes they
/// carry besides the keys. See the module docs of `store::dynamodb` for what each holds.
pub const INDEXES: [(&str, &str, &str, &[&str]); 5] = [
    (
        "gsi1",
        "g1pk",
        "g1sk",
        &[
            "id",
            "owner",
            "status",
            "options",
            "concurrency",
            "total",
            "n_running",
            "n_done",
            "n_cancelled",
        ],
    ),
    (
        "gsi2",
        "g2pk",
        "g2sk",
        &[
            "idx",
            "attempts",
            "endpoint",
            "params",
            "call",
            "id",
            "callback_url",
            "cb_attempts",
        ],
    ),
    ("gsi3", "g3pk", "g3sk", &["idx", "attempts"]),
    ("gsi4", "g4pk", "g4sk", &["status"]),
    ("gsi5", "g5pk", "g5sk", &["status"]),
];

fn key(name: &str, kind: KeyType) -> StoreResult<KeySchemaElement> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .map_err(|e| StoreError::Other(e.to_string()))
}

fn string_attribute(name: &str) -> StoreResult<AttributeDefinition> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(|e| StoreError::Other(e.to_string()))
}

/// What `doparallel migrate` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Migrated {
    Created,
    AlreadyThere,
}

/// Creates the table (on-demand capacity) with its indexes unless it exists, and waits
/// until it and its indexes are active.
pub async fn create_table(client: &Client, table: &str) -> StoreResult<Migrated> {
    let exists = match client.describe_table().table_name(table).send().await {
        Ok(_) => true,
        Err(e) if e.code() == Some("ResourceNotFoundException") => false,
        Err(e) => return Err(sdk_error("DescribeTable", e)),
    };
    let outcome = if exists {
        Migrated::AlreadyThere
    } else {
        let mut attributes = vec![string_attribute("pk")?, string_attribute("sk")?];
        let mut indexes = Vec::new();
        for (name, pk, sk, carried) in INDEXES {
            attributes.push(string_attribute(pk)?);
            attributes.push(string_attribute(sk)?);
            indexes.push(
                GlobalSecondaryIndex::builder()
                    .index_name(name)
                    .key_schema(key(pk, KeyType::Hash)?)
                    .key_schema(key(sk, KeyType::Range)?)
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::Include)
                            .set_non_key_attributes(Some(
                                carried.iter().map(|a| a.to_string()).collect(),
                            ))
                            .build(),
                    )
                    .build()
                    .map_err(|e| StoreError::Other(e.to_string()))?,
            );
        }
        client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(key("pk", KeyType::Hash)?)
            .key_schema(key("sk", KeyType::Range)?)
            .set_attribute_definitions(Some(attributes))
            .set_global_secondary_indexes(Some(indexes))
            .send()
            .await
            .map_err(|e| sdk_error("CreateTable", e))?;
        Migrated::Created
    };
    // A new table takes seconds to become active on a real region; bounded wait.
    for _ in 0..300 {
        let described = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| sdk_error("DescribeTable", e))?;
        let Some(t) = described.table() else {
            break;
        };
        let indexes_active = t
            .global_secondary_indexes()
            .iter()
            .all(|i| i.index_status() == Some(&IndexStatus::Active));
        if t.table_status() == Some(&TableStatus::Active) && indexes_active {
            return Ok(outcome);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(StoreError::Unavailable(format!(
        "table {table} did not become active within 5 minutes"
    )))
}

/// Checks that the table exists with every index this version uses. Answers whether the
/// claim index carries tasks' call settings: a table made before they existed does not
/// (an index's projection cannot change), and the store then refuses the jobs whose tasks
/// have settings of their own rather than call them without.
pub async fn check_table(client: &Client, location: &Location, region: &str) -> StoreResult<bool> {
    let described = match client
        .describe_table()
        .table_name(&location.table)
        .send()
        .await
    {
        Ok(d) => d,
        Err(e) if e.code() == Some("ResourceNotFoundException") => {
            return Err(StoreError::Other(format!(
                "table {} does not exist in region {region}; create it with `doparallel migrate --database {}`",
                location.table,
                location.url(region)
            )));
        }
        Err(e) => return Err(sdk_error("DescribeTable", e)),
    };
    let present: Vec<&str> = described
        .table()
        .map(|t| {
            t.global_secondary_indexes()
                .iter()
                .filter_map(|i| i.index_name())
                .collect()
        })
        .unwrap_or_default();
    let missing: Vec<&str> = INDEXES
        .iter()
        .map(|(name, ..)| *name)
        .filter(|name| !present.contains(name))
        .collect();
    if !missing.is_empty() {
        return Err(StoreError::Other(format!(
            "table {} in region {region} lacks the indexes {} that doparallel needs; it was not \
             created by `doparallel migrate` (or by an older version)",
            location.table,
            missing.join(", ")
        )));
    }
    let task_calls = described
        .table()
        .into_iter()
        .flat_map(|t| t.global_secondary_indexes())
        .filter(|i| i.index_name() == Some("gsi2"))
        .filter_map(|i| i.projection())
        .any(|p| p.non_key_attributes().iter().any(|a| a == "call"));
    if !task_calls {
        tracing::warn!(
            table = %location.table,
            "this table was created by an older version: jobs whose tasks set a method, headers, \
             aws_sigv4 or options of their own are refused on it (a table made by this version's \
             `doparallel migrate` takes them)"
        );
    }
    Ok(task_calls)
}

/// A failed request as a store error: throttling, timeouts, lost connections and any answer
/// in the 5xx range (a proxy's or load balancer's too, which carries no DynamoDB error code)
/// pass (`Unavailable`); the rest are bugs or misconfiguration.
pub fn sdk_error<E>(
    operation: &str,
    e: aws_sdk_dynamodb::error::SdkError<E, HttpResponse>,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    use aws_sdk_dynamodb::error::SdkError;
    let passing = match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(s) if s.raw().status().is_server_error() => true,
        SdkError::ServiceError(s) => matches!(
            s.err().code(),
            Some(
                "ProvisionedThroughputExceededException"
                    | "ThrottlingException"
                    | "RequestLimitExceeded"
                    | "InternalServerError"
                    | "ServiceUnavailable"
                    | "TransactionInProgressException"
            )
        ),
        _ => false,
    };
    let text = format!("DynamoDB {operation}: {}", DisplayErrorContext(&e));
    if passing {
        StoreError::Unavailable(text)
    } else {
        StoreError::Other(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, expected: Result<(&str, Option<&str>, Option<&str>), &str>) {
        match (Location::parse(url), expected) {
            (Ok(l), Ok((table, region, endpoint))) => {
                assert_eq!(l.table, table, "{url}");
                assert_eq!(l.region.as_deref(), region, "{url}");
                assert_eq!(l.endpoint.as_deref(), endpoint, "{url}");
            }
            (Err(e), Err(text)) => assert!(e.to_string().contains(text), "{url}: {e}"),
            (got, want) => panic!("{url}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn urls() {
        check(
            "dynamodb://Jobs_1?region=eu-west-1",
            Ok(("Jobs_1", Some("eu-west-1"), None)),
        );
        check(
            "dynamodb://jobs?region=us-east-1&endpoint=http://localhost:8000",
            Ok(("jobs", Some("us-east-1"), Some("http://localhost:8000"))),
        );
        check("dynamodb://jobs", Ok(("jobs", None, None)));
        check("dynamodb://x?region=a", Err("3-255 characters"));
        check(
            "dynamodb://jobs?regoin=a",
            Err("unknown parameter \"regoin\""),
        );
        check("dynamodb://jobs?endpoint=localhost", Err("is not a URL"));
        check("postgres://jobs", Err("does not start with dynamodb://"));
    }

    #[test]
    fn the_migrate_hint_repeats_the_url() {
        let l = Location::parse("dynamodb://jobs?endpoint=http://127.0.0.1:8000").unwrap();
        assert_eq!(
            l.url("us-east-1"),
            "dynamodb://jobs?region=us-east-1&endpoint=http://127.0.0.1:8000"
        );
    }
}
