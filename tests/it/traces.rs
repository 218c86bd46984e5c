//! Traces across services: the job joins the submitter's W3C trace, every call and
//! callback attempt carries a `traceparent` whose parent is its own span, and the spans
//! reach an OTLP/HTTP collector, here a receiver that decodes the protobuf with the
//! `opentelemetry-proto` crate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message;
use serde_json::json;

use crate::helpers::*;

/// One span as the collector received it; ids in hex.
#[derive(Clone, Debug)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attributes: HashMap<String, String>,
    service: String,
}

/// An OTLP/HTTP collector on loopback that keeps every span it is sent.
struct Collector {
    port: u16,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Collector {
    async fn start() -> Collector {
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Collector { port, spans }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

async fn receive(State(spans): State<Arc<Mutex<Vec<Span>>>>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
        .as_ref()
        .and_then(|v| v.value.as_ref())
    {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    };
    let mut kept = spans.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|a| a.key == "service.name")
            .map(|a| text(&a.value))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                kept.push(Span {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    name: span.name,
                    attributes: span
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), text(&a.value)))
                        .collect(),
                    service: service.clone(),
                });
            }
        }
    }
    // An empty ExportTraceServiceResponse.
    Vec::new()
}

/// The span id a `traceparent` names as the parent, and its trace.
fn parent_of(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1].to_string(), parts[2].to_string())
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn a_job_joins_the_callers_trace_and_every_attempt_is_a_span() {
    let collector = Collector::start().await;
    // A task's first attempt is answered 503, its second 200.
    let endpoint = RawEndpoint::start(|n, call, mut stream| async move {
        if call.path() == "/flaky" && n <= 3 && !call.header("doparallel-attempt").eq("2") {
            respond(&mut stream, "503 Service Unavailable", &[], b"").await;
        } else {
            respond(&mut stream, "200 OK", &[], b"{}").await;
        }
    })
    .await;
    let mut receiver = Receiver::start(0, 200).await;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::on(&db_path(&dir))
        .envs(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            &format!("http://127.0.0.1:{}", collector.port),
        )])
        .start();
    let api = &server.api;
    let (status, body) = {
        let response = api
            .http
            .post(format!("{}/v1/job", api.base))
            .header("content-type", "application/json")
            .header("traceparent", format!("00-{TRACE}-{CLIENT_SPAN}-01"))
            .header("tracestate", "vendor=opaque")
            .body(
                json!({
                    "callback": receiver.url(),
                    "options": {"backoff_ms": 1},
                    "tasks": [
                        {"endpoint": endpoint.url("/a?token=secret")},
                        {"endpoint": endpoint.url("/b"), "method": "GET"},
                        {"endpoint": endpoint.url("/flaky")}
                    ]
                })
                .to_string(),
            )
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    assert_eq!(status, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let delivery = receiver.next().await;
    let job = api.wait_settled(&id).await;
    assert_eq!(job["trace_id"], TRACE);
    assert!(job["options"].get("trace").is_none(), "{job}");

    // Every attempt carried a traceparent in the caller's trace, and the tracestate.
    let calls = endpoint.calls();
    assert_eq!(calls.len(), 4, "three tasks, one retried");
    let mut attempt_spans = Vec::new();
    for call in &calls {
        let (trace, span) = parent_of(&call.header("traceparent"));
        assert_eq!(trace, TRACE);
        assert_eq!(call.header("tracestate"), "vendor=opaque");
        attempt_spans.push(span);
    }
    let (trace, callback_span) = parent_of(delivery.headers["traceparent"].to_str().unwrap());
    assert_eq!(trace, TRACE);

    // The collector has the job's span, one span per attempt, and the callback's.
    let spans = eventually("the job's span is exported", || async {
        let spans = collector.spans();
        spans.iter().any(|s| s.name == "job").then_some(spans)
    })
    .await;
    assert!(spans.iter().all(|s| s.trace_id == TRACE), "{spans:#?}");
    assert!(spans.iter().all(|s| s.service == "doparallel"));
    let job_span = spans.iter().find(|s| s.name == "job").unwrap();
    assert_eq!(
        job_span.parent, CLIENT_SPAN,
        "the job is a child of the caller's span"
    );
    assert_eq!(job_span.attributes["doparallel.job_id"], id);
    assert_eq!(
        job_span.attributes["doparallel.callback.state"],
        "delivered"
    );
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    for span_id in &attempt_spans {
        let span = by_id
            .get(span_id.as_str())
            .unwrap_or_else(|| panic!("no span {span_id} for an attempt: {spans:#?}"));
        assert_eq!(
            span.parent, job_span.span_id,
            "an attempt is a child of the job"
        );
        assert!(["POST", "GET"].contains(&span.name.as_str()));
        assert_eq!(span.attributes["doparallel.job_id"], id);
        assert!(
            !span.attributes["url.full"].contains("token"),
            "no query in a span"
        );
    }
    let flaky: Vec<&&Span> = by_id
        .values()
        .filter(|s| {
            s.attributes
                .get("url.full")
                .is_some_and(|u| u.ends_with("/flaky"))
        })
        .collect();
    let mut codes: Vec<(String, String)> = flaky
        .iter()
        .map(|s| {
            (
                s.attributes["doparallel.attempt"].clone(),
                s.attributes["http.response.status_code"].clone(),
            )
        })
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [("1".into(), "503".into()), ("2".into(), "200".into())]
    );
    let callback = by_id
        .get(callback_span.as_str())
        .expect("the callback's span");
    assert_eq!(callback.name, "callback");
    assert_eq!(callback.parent, job_span.span_id);
    assert_eq!(spans.len(), 6, "{spans:#?}");
    assert_eq!(
        api.metric("doparallel_trace_spans_dropped_total").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn without_a_traceparent_a_job_starts_its_trace_and_unsampled_ones_are_not_exported() {
    let collector = Collector::start().await;
    let endpoint = RawEndpoint::start(|_, _, mut stream| async move {
        respond(&mut stream, "200 OK", &[], b"{}").await;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::on(&db_path(&dir))
        .envs(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            &format!("http://127.0.0.1:{}", collector.port),
        )])
        .start();
    let api = &server.api;
    let id = api
        .submit(&json!({"tasks": [{"endpoint": endpoint.url("/new")}]}))
        .await;
    let job = api.wait_settled(&id).await;
    let trace = job["trace_id"].as_str().unwrap().to_string();
    assert_eq!(trace.len(), 32);
    let (seen, _) = parent_of(&endpoint.calls()[0].header("traceparent"));
    assert_eq!(seen, trace);
    let spans = eventually("the spans of the new trace", || async {
        let spans = collector.spans();
        (spans.len() == 2).then_some(spans)
    })
    .await;
    let job_span = spans.iter().find(|s| s.name == "job").unwrap();
    assert_eq!(job_span.parent, "", "a new trace's job span is its root");
    assert_eq!(job_span.attributes["doparallel.callback.state"], "none");

    // The caller did not sample its trace: the calls carry it on, nothing is exported.
    let response = api
        .http
        .post(format!("{}/v1/job", api.base))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{TRACE}-{CLIENT_SPAN}-00"))
        .body(json!({"tasks": [{"endpoint": endpoint.url("/unsampled")}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id: serde_json::Value = response.json().await.unwrap();
    api.wait_settled(id["job_id"].as_str().unwrap()).await;
    let header = endpoint.calls()[1].header("traceparent");
    assert!(
        header.starts_with(&format!("00-{TRACE}-")) && header.ends_with("-00"),
        "{header}"
    );
    // Spans go out in the order they end, from one queue: once a later job's span is in,
    // any span of the unsampled job would be too.
    let later = api
        .submit(&json!({"tasks": [{"endpoint": endpoint.url("/later")}]}))
        .await;
    api.wait_settled(&later).await;
    let spans = eventually("the later job's span", || async {
        let spans = collector.spans();
        spans
            .iter()
            .any(|s| s.name == "job" && s.attributes["doparallel.job_id"] == later)
            .then_some(spans)
    })
    .await;
    assert!(spans.iter().all(|s| s.trace_id != TRACE), "{spans:#?}");
}

#[tokio::test]
async fn a_collector_that_is_down_costs_spans_not_jobs() {
    // Nothing listens there: every export fails, the jobs go on, and the lost spans are
    // counted.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::on(&db_path(&dir))
        .envs(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            &format!("http://127.0.0.1:{port}"),
        )])
        .start();
    let endpoint = RawEndpoint::start(|_, _, mut stream| async move {
        respond(&mut stream, "200 OK", &[], b"{}").await;
    })
    .await;
    let id = server
        .api
        .submit(
            &json!({"tasks": [{"endpoint": endpoint.url("/x")}, {"endpoint": endpoint.url("/y")}]}),
        )
        .await;
    assert_eq!(server.api.wait_settled(&id).await["status"], "Complete");
    eventually("the lost spans are counted", || async {
        let dropped = server
            .api
            .metric("doparallel_trace_spans_dropped_total")
            .await
            .unwrap_or(0.0);
        (dropped >= 3.0).then_some(())
    })
    .await;
}
