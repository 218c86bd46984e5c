//! The HTTP API: the seed's routes (`POST /v1/job`, `POST /v1/test`), the routes that read,
//! cancel and delete jobs, the events stream, `/metrics` and `/openapi.json`.
//!
//! Handlers validate, read the store or carry out a command (`commands`: commit to the
//! store, then signal on the bus), and shape JSON (`wire`); they hold no state of their
//! own, and know neither the engine nor the outbox. The rooms: `jobs` (the job routes),
//! `events` (the SSE stream), `service` (reports, the test task, health, metrics,
//! OpenAPI), `error` (every error leaves as `{"status":"Error","msg":...}` through
//! [`ApiError`]). The OpenAPI document is generated from the `#[utoipa::path]` annotations on
//! the handlers and the `ToSchema` types of `wire`, so it cannot drift from the code.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use utoipa::OpenApi;

pub mod commands;
mod control;
mod error;
mod events;
mod groups;
mod jobs;
mod service;
pub mod wire;

pub use commands::Services;
pub use error::ApiError;

use crate::auth::{ApiTokens, require_token};
use crate::egress::EgressPolicy;
use crate::job::{JobId, Limits};
use crate::store::Millis;
use control::{pause_job, resume_job, retry_job, update_job};
use events::job_events;
use jobs::{cancel_job, delete_job, get_job, list_jobs, list_tasks, submit, submit_alias};
use service::{health, heartbeat_task, hosts, metrics, not_found, openapi, report_task, test_task};

#[derive(Clone)]
struct AppState {
    services: Services,
    config: Arc<ApiConfig>,
}

/// What the API needs to know.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Bounds on a submission.
    pub limits: Limits,
    /// Which addresses a submission's IP literals may name.
    pub egress: Arc<EgressPolicy>,
    /// Seals the values of a submission's secret headers.
    pub sealer: Arc<crate::sealing::Sealer>,
    /// A job's results are shown whole up to this size, else a link to its tasks.
    pub max_callback_bytes: usize,
    /// The largest outcome an endpoint may report.
    pub max_response_bytes: usize,
    /// Serve `GET /v1/jobs/{id}/events`. Off where a response cannot stream (AWS Lambda
    /// buffers it whole): without the route, the CLI and the dashboard poll instead.
    pub event_streams: bool,
    /// The concurrency of a group without its own (`--group-concurrency`), as the group
    /// routes show it.
    pub group_concurrency: Option<u32>,
}

/// The API's routes over the node's services. With `tokens`, every route but
/// `POST /v1/test`, `/healthz` and `/openapi.json` needs one (see `crate::auth`).
pub fn router(
    services: Services,
    config: ApiConfig,
    tokens: Arc<ApiTokens>,
    max_body_bytes: usize,
) -> Router {
    let mut guarded = Router::new()
        .route("/v1/job", post(submit))
        .route("/v1/jobs", post(submit_alias).get(list_jobs))
        .route(
            "/v1/jobs/{id}",
            get(get_job).delete(delete_job).patch(update_job),
        )
        .route("/v1/jobs/{id}/tasks", get(list_tasks))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/retry", post(retry_job))
        .route("/v1/jobs/{id}/pause", post(pause_job))
        .route("/v1/jobs/{id}/resume", post(resume_job));
    if config.event_streams {
        guarded = guarded.route("/v1/jobs/{id}/events", get(job_events));
    }
    let guarded = guarded
        .route("/v1/groups", get(groups::list_groups))
        .route(
            "/v1/groups/{name}",
            get(groups::get_group)
                .put(groups::put_group)
                .delete(groups::delete_group),
        )
        .route("/v1/hosts", get(hosts))
        .route("/metrics", get(metrics))
        .merge(crate::dashboard::page_router())
        .route_layer(middleware::from_fn_with_state(tokens, require_token));
    let open = Router::new()
        .route("/v1/test", post(test_task))
        // The task token in the path is the credential: the endpoint reporting an outcome
        // holds no API token.
        .route("/v1/tasks/{token}/result", post(report_task))
        .route("/v1/tasks/{token}/heartbeat", post(heartbeat_task))
        .route("/healthz", get(health))
        .route("/openapi.json", get(openapi))
        // The dashboard's scripts and styles are the same for everyone and hold no data.
        .merge(crate::dashboard::assets_router());
    guarded
        .merge(open)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(AppState {
            services,
            config: Arc::new(config),
        })
}

/// The OpenAPI 3.1 document of every route.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "DoParallel",
        description = "Fan-out/fan-in job runner: calls every task's endpoint in parallel, \
                       stores each result durably, and POSTs the collected results to the \
                       job's callback.",
        license(name = "MIT", identifier = "MIT")
    ),
    paths(
        jobs::submit,
        jobs::submit_alias,
        jobs::list_jobs,
        jobs::get_job,
        jobs::delete_job,
        jobs::list_tasks,
        jobs::cancel_job,
        control::retry_job,
        control::pause_job,
        control::update_job,
        control::resume_job,
        events::job_events,
        service::report_task,
        service::heartbeat_task,
        groups::list_groups,
        groups::get_group,
        groups::put_group,
        groups::delete_group,
        service::hosts,
        service::test_task,
        service::health,
        service::metrics,
        service::openapi,
        crate::dashboard::index,
        crate::dashboard::asset
    )
)]
pub struct ApiDoc;

fn parse_job_id(text: &str) -> Result<JobId, ApiError> {
    text.parse()
        .map_err(|_| ApiError::no_job(format!("{text:?}")))
}

fn rfc3339(millis: Millis) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_covers_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        for (path, method) in [
            ("/v1/job", "post"),
            ("/v1/jobs", "post"),
            ("/v1/jobs", "get"),
            ("/v1/jobs/{id}", "get"),
            ("/v1/jobs/{id}", "delete"),
            ("/v1/jobs/{id}/tasks", "get"),
            ("/v1/jobs/{id}/cancel", "post"),
            ("/v1/jobs/{id}/events", "get"),
            ("/v1/groups", "get"),
            ("/v1/groups/{name}", "get"),
            ("/v1/groups/{name}", "put"),
            ("/v1/groups/{name}", "delete"),
            ("/v1/test", "post"),
            ("/healthz", "get"),
            ("/metrics", "get"),
            ("/openapi.json", "get"),
            ("/", "get"),
            ("/assets/{name}", "get"),
        ] {
            assert!(
                paths[path][method].is_object(),
                "{method} {path} is missing"
            );
        }
    }

    #[test]
    fn the_document_gives_the_per_host_options_and_their_bounds() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let options = &doc["components"]["schemas"]["JobOptions"]["properties"];
        let concurrency = &doc["components"]["schemas"]["HostConcurrency"];
        let text = concurrency.to_string();
        assert!(
            text.contains(r#""minimum":1"#) && text.contains(r#""enum":["auto"]"#),
            "a number from 1, or auto: {concurrency}"
        );
        let rate = &options["per_host_rate"];
        assert_eq!(rate["minimum"], 0.001, "{rate}");
        assert!(
            rate["description"]
                .as_str()
                .is_some_and(|d| d.contains("per second")),
            "{rate}"
        );
    }
}
