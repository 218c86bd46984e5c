//! Prometheus metrics: what `/metrics` shows, recorded where things happen.
//!
//! One registry per engine, not a process-wide one, so tests that run several servers in one
//! process see their own figures.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabel {
    pub host: String,
}

pub struct Metrics {
    registry: Registry,
    pub jobs_submitted: Counter,
    pub jobs_finished: Family<StatusLabel, Counter>,
    pub tasks_finished: Family<OutcomeLabel, Counter>,
    pub task_retries: Counter,
    pub leases_expired: Counter,
    pub tasks_accepted: Counter,
    pub call_seconds: Histogram,
    pub calls_in_flight: Gauge,
    pub callback_deliveries: Family<OutcomeLabel, Counter>,
    pub queue_depth: Gauge,
    pub host_gate_waiting: Gauge,
    pub host_pauses: Counter,
    /// The adaptive limit of each host called under one (`--per-host-concurrency auto`).
    pub host_concurrency_limit: Family<HostLabel, Gauge>,
    pub host_breaker_trips: Counter,
    /// Spans dropped: a full export queue, or a batch the collector refused (see
    /// `crate::telemetry`).
    pub trace_spans_dropped: Counter,
    /// Incoming connections (see `crate::listener`).
    pub connections: crate::listener::ConnectionMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("doparallel");
        let jobs_submitted = Counter::default();
        registry.register("jobs_submitted", "Jobs accepted", jobs_submitted.clone());
        let jobs_finished = Family::<StatusLabel, Counter>::default();
        registry.register(
            "jobs_finished",
            "Jobs finished, by final status",
            jobs_finished.clone(),
        );
        let tasks_finished = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "tasks_finished",
            "Tasks finished, by outcome (complete, failed, cancelled)",
            tasks_finished.clone(),
        );
        let task_retries = Counter::default();
        registry.register(
            "task_retries",
            "Attempts that failed and were scheduled again",
            task_retries.clone(),
        );
        let leases_expired = Counter::default();
        registry.register(
            "leases_expired",
            "Running tasks this node took back because their node's lease ran out",
            leases_expired.clone(),
        );
        let tasks_accepted = Counter::default();
        registry.register(
            "tasks_accepted",
            "Attempts answered with 202, their outcome to be reported later",
            tasks_accepted.clone(),
        );
        // 1 ms to about 65 s.
        let call_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register(
            "task_call_seconds",
            "Duration of task calls, each attempt counted",
            call_seconds.clone(),
        );
        let calls_in_flight = Gauge::default();
        registry.register(
            "calls_in_flight",
            "Task calls in flight on this node",
            calls_in_flight.clone(),
        );
        let callback_deliveries = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "callback_deliveries",
            "Callback attempts, by outcome (delivered, retry, gave_up; refused: due for a job the store says is not finished, not sent)",
            callback_deliveries.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Tasks of unfinished jobs waiting to be called",
            queue_depth.clone(),
        );
        let host_gate_waiting = Gauge::default();
        registry.register(
            "host_gate_waiting",
            "Task calls waiting at per-host gates (concurrency, rate or a pause) on this node",
            host_gate_waiting.clone(),
        );
        let host_pauses = Counter::default();
        registry.register(
            "host_pauses",
            "Pauses of all calls to a host set or extended by its 429 or 503 answers",
            host_pauses.clone(),
        );
        let host_concurrency_limit = Family::<HostLabel, Gauge>::default();
        registry.register(
            "host_concurrency_limit",
            "The adaptive limit on calls in flight to a host (--per-host-concurrency auto), on this node",
            host_concurrency_limit.clone(),
        );
        let host_breaker_trips = Counter::default();
        registry.register(
            "host_breaker_trips",
            "Times a host's breaker opened after connection failures in a row (its calls wait)",
            host_breaker_trips.clone(),
        );
        let trace_spans_dropped = Counter::default();
        registry.register(
            "trace_spans_dropped",
            "Spans not exported: the export queue was full, or the collector refused their batch",
            trace_spans_dropped.clone(),
        );
        let connections = crate::listener::ConnectionMetrics::default();
        registry.register(
            "http_connections_open",
            "Incoming connections open",
            connections.open.clone(),
        );
        registry.register(
            "http_connections_refused",
            "Incoming connections closed at once because --max-connections were open",
            connections.refused.clone(),
        );
        registry.register(
            "http_connections_timed_out",
            "Incoming connections closed for a request head not sent in time, or idle too long",
            connections.timed_out.clone(),
        );
        Metrics {
            registry,
            connections,
            jobs_submitted,
            jobs_finished,
            tasks_finished,
            task_retries,
            leases_expired,
            tasks_accepted,
            call_seconds,
            calls_in_flight,
            callback_deliveries,
            queue_depth,
            host_gate_waiting,
            host_pauses,
            host_concurrency_limit,
            host_breaker_trips,
            trace_spans_dropped,
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn job_finished(&self, status: crate::job::JobStatus) {
        self.jobs_finished
            .get_or_create(&StatusLabel {
                status: status.as_str(),
            })
            .inc();
    }

    pub fn tasks_finished(&self, outcome: &'static str, n: u64) {
        self.tasks_finished
            .get_or_create(&OutcomeLabel { outcome })
            .inc_by(n);
    }

    /// Attempts this node made and settled: complete, failed, retried, or answered 202.
    pub fn attempts_made(&self) -> u64 {
        let outcome = |outcome| {
            self.tasks_finished
                .get_or_create(&OutcomeLabel { outcome })
                .get()
        };
        outcome("complete")
            + outcome("failed")
            + self.task_retries.get()
            + self.tasks_accepted.get()
    }

    /// Callback attempts this node made (delivered, to be retried, or given up).
    pub fn callback_attempts_made(&self) -> u64 {
        ["delivered", "retry", "gave_up"]
            .into_iter()
            .map(|outcome| {
                self.callback_deliveries
                    .get_or_create(&OutcomeLabel { outcome })
                    .get()
            })
            .sum()
    }

    pub fn callback_attempt(&self, outcome: &'static str) {
        self.callback_deliveries
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
