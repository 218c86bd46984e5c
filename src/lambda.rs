//! `doparallel lambda`: the same node as an AWS Lambda function, as the original ran.
//!
//! One function body serves two kinds of event:
//! - an HTTP event (a function URL or an API Gateway HTTP API, both in the version 2.0
//!   format; an API Gateway REST API; an Application Load Balancer) goes to the same router
//!   as `serve`, on an API-only node kept from one invocation to the next. When the request
//!   made work due (a job accepted, an outcome reported, a job cancelled), the worker
//!   function is invoked asynchronously before the answer goes back, so that the job starts
//!   within a second instead of at the next schedule;
//! - `{"doparallel": "work"}` (the worker's own invocation) or a scheduled event drains due
//!   work as `doparallel work --until-idle` does, on a node started for this invocation and
//!   stopped before it ends: Lambda freezes a process between invocations, and a call left
//!   running in a frozen process would hold its lease without making progress.
//!
//! The store's leases make any number of concurrent worker invocations (and `serve` or
//! `work` processes on the same database) correct; the worker function's reserved
//! concurrency bounds them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lambda_http::request::LambdaRequest;
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::{Value, json};
use tower::Service;

use crate::api;
use crate::auth::ApiTokens;
use crate::aws::CallSigner;
use crate::server::{Node, Role, ServeError, Settings, WorkOptions};
use crate::store::Store;

/// What `doparallel lambda` needs besides its store.
#[derive(Clone, Debug)]
pub struct LambdaOptions {
    pub settings: Settings,
    /// Empty: no authentication.
    pub tokens: ApiTokens,
    pub max_body_bytes: usize,
    /// After a drain stops taking work, how long the calls in flight may take to settle;
    /// shortened when the invocation has less time left.
    pub shutdown_grace: Duration,
    /// Invoked asynchronously when a request made work due; `None`: the schedule alone
    /// starts the work.
    pub worker: Option<WorkerFunction>,
}

/// The Lambda function the API wakes, and where its `Invoke` is sent.
#[derive(Clone, Debug)]
pub struct WorkerFunction {
    /// A function name or ARN.
    pub name: String,
    pub region: String,
    /// The Lambda API's base URL: `https://lambda.REGION.amazonaws.com`, or another one
    /// (`AWS_ENDPOINT_URL_LAMBDA`, as the AWS SDKs read it; a local emulator).
    pub endpoint: url::Url,
}

impl WorkerFunction {
    /// The function `name`, invoked in the region and at the endpoint that the standard AWS
    /// environment variables give (`AWS_REGION`, which Lambda sets, or
    /// `AWS_DEFAULT_REGION`; `AWS_ENDPOINT_URL_LAMBDA` or `AWS_ENDPOINT_URL`).
    pub fn from_env(name: String) -> Result<WorkerFunction, String> {
        let region = std::env::var("AWS_REGION")
            .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
            .map_err(|_| {
                format!("no AWS region to invoke worker function {name} in: set AWS_REGION")
            })?;
        let endpoint = match std::env::var("AWS_ENDPOINT_URL_LAMBDA")
            .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        {
            Ok(url) => url::Url::parse(&url)
                .map_err(|e| format!("AWS_ENDPOINT_URL_LAMBDA {url:?} is not a URL: {e}"))?,
            Err(_) => url::Url::parse(&format!("https://lambda.{region}.amazonaws.com"))
                .map_err(|e| format!("AWS_REGION {region:?} makes no endpoint URL: {e}"))?,
        };
        Ok(WorkerFunction {
            name,
            region,
            endpoint,
        })
    }
}

/// A drain stops taking work this long (beyond the calls' grace) before the invocation's
/// deadline: the stop itself (abandoning the calls left, up to 1 s; the last outcomes
/// written; the leases loop ended; spans flushed, up to 2 s) takes place in it.
const STOP_MARGIN: Duration = Duration::from_secs(5);

/// Lambda gives an invocation's deadline in milliseconds since the epoch; cargo-lambda's
/// local emulator gives the function's timeout instead (600000, ten minutes). A value this
/// small (a time before September 2001) is read as the time left.
const RELATIVE_DEADLINE_BELOW: u64 = 1_000_000_000_000;

/// How long the API waits for `Invoke` to accept the worker's event (it answers at once
/// when it queues it); past it the schedule starts the work.
const INVOKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Errors a handler returns to the Lambda runtime, which reports them as the invocation's
/// error.
pub type HandlerError = lambda_runtime::Error;

/// The function's state, kept across invocations.
pub struct Function {
    node: Node,
    router: axum::Router,
    store: Arc<dyn Store>,
    settings: Settings,
    shutdown_grace: Duration,
    worker: Option<WorkerInvoker>,
}

/// Sends the worker function's `Invoke`.
pub struct WorkerInvoker {
    function: WorkerFunction,
    http: reqwest::Client,
    signer: CallSigner,
}

impl Function {
    /// Starts the API-only node the HTTP events are served by (once per cold start).
    pub async fn start(store: Arc<dyn Store>, options: LambdaOptions) -> Result<Self, ServeError> {
        let mut parts = options.settings.parts(None);
        parts.api.event_streams = false;
        let api_config = parts.api.clone();
        let node = Node::start(store.clone(), parts, Role::ApiOnly).await?;
        let router = api::router(
            node.services.clone(),
            api_config,
            Arc::new(options.tokens),
            options.max_body_bytes,
        );
        let worker = match options.worker {
            Some(function) => Some(WorkerInvoker::new(function).map_err(ServeError::Http)?),
            None => {
                tracing::info!("no worker function: work starts at the next scheduled event");
                None
            }
        };
        Ok(Function {
            node,
            router,
            store,
            settings: options.settings,
            shutdown_grace: options.shutdown_grace,
            worker,
        })
    }

    /// Handles one invocation: an HTTP event is answered in the shape its origin expects;
    /// a work event is answered with what the drain did (`calls`, `callbacks`, `ended`).
    pub async fn handle(&self, event: LambdaEvent<Value>) -> Result<Value, HandlerError> {
        let (payload, context) = event.into_parts();
        match work_command(&payload)? {
            Some(source) => {
                let report = self.drain(context.deadline, source).await?;
                Ok(serde_json::to_value(report)?)
            }
            None => {
                let request: LambdaRequest = serde_json::from_value(payload).map_err(|e| {
                    format!(
                        "the event is neither an HTTP request (function URL, API Gateway, \
                         ALB) nor {{\"doparallel\": \"work\"}}: {e}"
                    )
                })?;
                let mut adapter = lambda_http::Adapter::from(self.router.clone());
                let response = adapter.call(LambdaEvent::new(request, context)).await?;
                if self.node.services.bus.take_wakeups() {
                    self.wake_worker().await;
                }
                self.node.telemetry.flush(Duration::from_secs(1)).await;
                Ok(serde_json::to_value(response)?)
            }
        }
    }

    /// Drains due work until nothing is left within the idle margin or the invocation's
    /// time (`deadline`, milliseconds since the epoch; 0: none) is nearly out.
    async fn drain(
        &self,
        deadline: u64,
        source: &str,
    ) -> Result<crate::server::WorkReport, ServeError> {
        let (max_duration, grace) = match deadline {
            0 => (None, self.shutdown_grace),
            ms => {
                let left = if ms < RELATIVE_DEADLINE_BELOW {
                    Duration::from_millis(ms)
                } else {
                    Duration::from_millis(ms).saturating_sub(
                        SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default(),
                    )
                };
                // Calls in flight get at most a quarter of the time left to settle.
                let grace = self.shutdown_grace.min(left / 4);
                (Some(left.saturating_sub(grace + STOP_MARGIN)), grace)
            }
        };
        tracing::info!(source, deadline, ?max_duration, "draining due work");
        let options = WorkOptions {
            settings: self.settings.clone(),
            until_idle: true,
            max_duration,
            shutdown_grace: grace,
        };
        let report =
            crate::server::work(self.store.clone(), options, std::future::pending()).await?;
        tracing::info!(
            calls = report.calls,
            callbacks = report.callbacks,
            ended = ?report.ended,
            "work done"
        );
        Ok(report)
    }

    /// Invokes the worker function asynchronously; a failure is logged and left to the
    /// schedule, which drains whatever this would have.
    async fn wake_worker(&self) {
        let Some(invoker) = &self.worker else {
            return;
        };
        match invoker.invoke().await {
            Ok(()) => tracing::debug!(function = %invoker.function.name, "worker invoked"),
            Err(e) => tracing::warn!(
                function = %invoker.function.name,
                error = %e,
                "cannot invoke the worker function; the next scheduled run starts the work"
            ),
        }
    }
}

/// What a function name keeps unencoded in the `Invoke` path: the unreserved characters.
/// An ARN's or an alias's `:` is sent as `%3A`, as the AWS SDKs send it (SigV4 then encodes
/// the path once more, as Lambda does when it checks the signature).
const FUNCTION_NAME: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

impl WorkerInvoker {
    pub fn new(function: WorkerFunction) -> Result<Self, reqwest::Error> {
        Ok(WorkerInvoker {
            function,
            http: reqwest::Client::builder().timeout(INVOKE_TIMEOUT).build()?,
            signer: CallSigner::default(),
        })
    }

    /// `Invoke` with `InvocationType=Event`, signed with the credentials of the AWS SDK's
    /// chain (in Lambda, the function's role).
    pub async fn invoke(&self) -> Result<(), String> {
        let url = format!(
            "{}/2015-03-31/functions/{}/invocations",
            self.function.endpoint.as_str().trim_end_matches('/'),
            percent_encoding::utf8_percent_encode(&self.function.name, FUNCTION_NAME)
        );
        let body = json!({"doparallel": "work"}).to_string();
        let mut request = self
            .http
            .post(url)
            .header("x-amz-invocation-type", "Event")
            .header("content-type", "application/json")
            .body(body.clone())
            .build()
            .map_err(|e| e.to_string())?;
        self.signer
            .sign(
                &mut request,
                body.as_bytes(),
                "lambda",
                &self.function.region,
            )
            .await?;
        let response = self
            .http
            .execute(request)
            .await
            .map_err(|e| e.without_url().to_string())?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        Err(format!("Invoke answered {status}: {}", text.trim()))
    }
}

/// Whether `payload` asks for a drain, and who asked: `{"doparallel": "work"}` (the API's
/// invocation, or a schedule's input), or an EventBridge scheduled event.
fn work_command(payload: &Value) -> Result<Option<&'static str>, String> {
    match payload.get("doparallel") {
        Some(Value::String(command)) if command == "work" => return Ok(Some("invoke")),
        Some(other) => {
            return Err(format!(
                "unknown command {other} in \"doparallel\"; the only one is \"work\""
            ));
        }
        None => {}
    }
    let scheduled = payload.get("source").and_then(Value::as_str) == Some("aws.events")
        || payload.get("detail-type").and_then(Value::as_str) == Some("Scheduled Event");
    Ok(scheduled.then_some("schedule"))
}

/// Runs `function` under the Lambda runtime (its API at `AWS_LAMBDA_RUNTIME_API`) until
/// the process is stopped.
pub async fn run(function: Function) -> Result<(), HandlerError> {
    let function = Arc::new(function);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let function = function.clone();
        async move { function.handle(event).await }
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_commands() {
        assert_eq!(
            work_command(&json!({"doparallel": "work"})),
            Ok(Some("invoke"))
        );
        assert_eq!(
            work_command(&json!({"source": "aws.events", "detail-type": "Scheduled Event"})),
            Ok(Some("schedule"))
        );
        assert_eq!(work_command(&json!({"version": "2.0"})), Ok(None));
        let refused = work_command(&json!({"doparallel": "serve"})).unwrap_err();
        assert!(refused.contains("\"serve\""), "{refused}");
    }
}
