"""Every stream, subject, consumer and bucket name meshflow uses, and nothing else.

All names derive from one namespace (default ``mf``), so several deployments can share a server.
No other module spells a subject or a bucket name.

Event names map to subjects by turning ``/`` into ``.``: ``app/user.created`` is published on
``{ns}.ev.app.user.created``. That makes an Inngest-style suffix wildcard (``app/*``) the NATS
wildcard ``{ns}.ev.app.>``. Two names can map to one subject (``a/b.c`` and ``a.b/c``); workers
therefore match the event's own name against their triggers after a consumer delivers it.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_NAMESPACE = "mf"


@dataclass(frozen=True, slots=True)
class Names:
    """The NATS names of one meshflow deployment (one namespace)."""

    ns: str = DEFAULT_NAMESPACE

    # --- streams -----------------------------------------------------------------------------
    @property
    def events_stream(self) -> str:
        """Every event ever sent (limits retention, replayable by time)."""
        return f"{self.ns.upper()}_EVENTS"

    @property
    def runs_stream(self) -> str:
        """'Advance run X' messages and the scheduled timer messages that produce them."""
        return f"{self.ns.upper()}_RUNS"

    @property
    def logs_stream(self) -> str:
        """What runs log (``ctx.logger``), a subject per run, kept for a while (``meshflow.logs``)."""
        return f"{self.ns.upper()}_LOGS"

    @property
    def index_stream(self) -> str:
        """The runs index, append only: runs by creation, and as they end (``meshflow.runindex``)."""
        return f"{self.ns.upper()}_INDEX"

    @property
    def live_stream(self) -> str:
        """The runs index's live part: the status of each run that has not ended."""
        return f"{self.ns.upper()}_LIVE"

    # --- subjects ----------------------------------------------------------------------------
    @property
    def events_subjects(self) -> str:
        return f"{self.ns}.ev.>"

    def event_subject(self, event_name: str) -> str:
        """The subject an event named ``event_name`` is published on."""
        return f"{self.ns}.ev.{event_name.replace('/', '.')}"

    def trigger_subject(self, pattern: str) -> str:
        """The consumer filter for a trigger: an exact event name or a prefix ending in ``*``."""
        if pattern.endswith("*"):
            return f"{self.ns}.ev.{pattern[:-1].replace('/', '.')}>"
        return self.event_subject(pattern)

    @property
    def run_subjects(self) -> list[str]:
        return [f"{self.ns}.run.>", f"{self.ns}.timer.>"]

    def run_subject(self, app_id: str, fn_id: str) -> str:
        """Where 'advance this run' messages for one function go (the schedule target too)."""
        return f"{self.ns}.run.{app_id}.{fn_id}"

    def log_subject(self, run_id: str) -> str:
        """The log records of one run (stored in the logs stream, followed live by subscribers)."""
        return f"{self.ns}.log.{run_id}"

    @property
    def log_subjects(self) -> str:
        return f"{self.ns}.log.*"

    # The runs index (see ``meshflow.runindex``).
    @property
    def index_subjects(self) -> str:
        return f"{self.ns}.idx.>"

    def index_new_subject(self, function: str, run_id: str) -> str:
        """A run, written once as it is created: the stream's order is the runs' creation order."""
        return f"{self.ns}.idx.new.{function}.{run_id}"

    def index_new_filter(self, function: str | None) -> str:
        return f"{self.ns}.idx.new.{function or '*'}.*"

    def index_end_subject(self, status: str, function: str, run_id: str) -> str:
        """A run that ended, written once as it does."""
        return f"{self.ns}.idx.end.{status}.{function}.{run_id}"

    def index_end_filter(self, status: str, function: str | None) -> str:
        return f"{self.ns}.idx.end.{status}.{function or '*'}.*"

    @property
    def index_ready_subject(self) -> str:
        """Written once the index holds every run (the sweeper filled in those from before it)."""
        return f"{self.ns}.idx.ready"

    @property
    def live_subjects(self) -> str:
        return f"{self.ns}.live.>"

    def live_subject(self, status: str, function: str, run_id: str) -> str:
        """The status of a run that has not ended, rewritten as it changes."""
        return f"{self.ns}.live.{status}.{function}.{run_id}"

    def live_filter(self, status: str | None, function: str | None, run_id: str = "*") -> str:
        return f"{self.ns}.live.{status or '*'}.{function or '*'}.{run_id}"

    def cancel_subject(self, run_id: str) -> str:
        """Core NATS (not stored): tells the worker running ``run_id`` to stop between steps."""
        return f"{self.ns}.cancel.{run_id}"

    @property
    def cancel_subjects(self) -> str:
        return f"{self.ns}.cancel.*"

    def started_subject(self, app_id: str, fn_id: str) -> str:
        """Core NATS (not stored): a run of the function started (for metrics)."""
        return f"{self.ns}.started.{app_id}.{fn_id}"

    @property
    def started_subjects(self) -> str:
        return f"{self.ns}.started.>"

    def control_subject(self, operation: str) -> str:
        """Core NATS requests a worker serves for clients that may not write runs (`control`)."""
        return f"{self.ns}.ctl.{operation}"

    @property
    def control_subjects(self) -> str:
        return f"{self.ns}.ctl.*"

    def cron_subject(self, app_id: str, fn_id: str, cron_key: str) -> str:
        """The pending schedule of a function's next cron tick (one per cron trigger)."""
        return f"{self.ns}.timer.cron.{app_id}.{fn_id}.{cron_key}"

    def timer_subject(self, run_id: str, key: str) -> str:
        """One pending timer (sleep, retry backoff) of a run; its own subject so it can be replaced."""
        return f"{self.ns}.timer.{run_id}.{key}"

    # --- consumers ---------------------------------------------------------------------------
    @staticmethod
    def trigger_consumer(app_id: str, fn_id: str) -> str:
        """The durable consumer on the events stream that fans events out to one function."""
        return f"fn-{app_id}-{fn_id}"

    @staticmethod
    def run_consumer(app_id: str, fn_id: str) -> str:
        """The durable consumer on the runs stream that workers pull a function's runs from."""
        return f"run-{app_id}-{fn_id}"

    @staticmethod
    def route_consumer(name_token: str) -> str:
        """The durable consumer on the events stream, shared by all workers, that routes the
        events of one name some run has waited for to the runs waiting (see ``router``)."""
        return f"route-{name_token}"

    # --- key-value buckets -------------------------------------------------------------------
    @property
    def runs_bucket(self) -> str:
        return f"{self.ns}_runs"

    @property
    def steps_bucket(self) -> str:
        return f"{self.ns}_steps"

    @property
    def registry_bucket(self) -> str:
        return f"{self.ns}_registry"

    @property
    def waits_bucket(self) -> str:
        """Runs waiting for events, indexed by event name and match value (see ``waits``)."""
        return f"{self.ns}_waits"

    @staticmethod
    def step_key(run_id: str, step_hash: str) -> str:
        return f"{run_id}.{step_hash}"

    @staticmethod
    def step_prefix(run_id: str) -> str:
        return f"{run_id}.>"

    @staticmethod
    def function_key(full_id: str) -> str:
        return f"fn.{full_id}"

    @property
    def flow_bucket(self) -> str:
        """Flow-control state with per-key TTLs: idempotency claims (more to come)."""
        return f"{self.ns}_flow"

    @staticmethod
    def idempotency_key(full_id: str, token: str) -> str:
        return f"idem.{full_id}.{token}"

    @staticmethod
    def worker_key(worker_id: str) -> str:
        return f"worker.{worker_id}"

    # Waiter keys. ``name`` is a token for the event name (names may hold '.' and '/'), ``field``
    # one for the match path, ``value`` one for the match value: see ``waits.tokens``.
    @staticmethod
    def wait_name_key(name: str) -> str:
        """Marks that runs wait for this event name (its value is the name): workers route it."""
        return f"{name}.n"

    @property
    def wait_names(self) -> str:
        return "*.n"

    @staticmethod
    def wait_field_key(name: str, field: str) -> str:
        """Marks that some run waits for ``name`` matching on ``field`` (the router looks these up)."""
        return f"{name}.f.{field}"

    @staticmethod
    def wait_fields(name: str) -> str:
        return f"{name}.f.*"

    @staticmethod
    def wait_match_key(name: str, field: str, value: str, run_id: str, step: str, index: int) -> str:
        return f"{name}.m.{field}.{value}.{run_id}.{step}.{index}"

    @staticmethod
    def wait_matches(name: str, field: str, value: str) -> str:
        return f"{name}.m.{field}.{value}.>"

    @staticmethod
    def wait_scan_key(name: str, run_id: str, step: str, index: int) -> str:
        """A waiter without ``match``: checked against every event of its name."""
        return f"{name}.x.{run_id}.{step}.{index}"

    @staticmethod
    def wait_scans(name: str) -> str:
        return f"{name}.x.>"


# Events meshflow itself emits (names, not subjects).
EVENT_FUNCTION_FINISHED = "meshflow/function.finished"
EVENT_FUNCTION_FAILED = "meshflow/function.failed"
EVENT_FUNCTION_INVOKED = "meshflow/function.invoked"
EVENT_FUNCTION_CANCELLED = "meshflow/function.cancelled"
EVENT_CRON = "meshflow/cron"

# Message headers meshflow reads or writes.
HDR_MSG_ID = "Nats-Msg-Id"
HDR_SCHEDULE = "Nats-Schedule"
HDR_SCHEDULE_TARGET = "Nats-Schedule-Target"
HDR_SCHEDULE_TTL = "Nats-Schedule-TTL"
HDR_TTL = "Nats-TTL"
HDR_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
HDR_KV_OPERATION = "KV-Operation"
HDR_ROLLUP = "Nats-Rollup"
# W3C trace context (https://www.w3.org/TR/trace-context/), lower case as OpenTelemetry writes it.
HDR_TRACEPARENT = "traceparent"
HDR_TRACESTATE = "tracestate"


def kv_stream(bucket: str) -> str:
    """The stream behind a key-value bucket."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    """The subject a key-value entry is stored under (keys may be wildcards like ``run.>``)."""
    return f"$KV.{bucket}.{key}"


# --- JetStream API subjects (the requests meshflow makes without nats-py's helpers) -----------
def direct_get_subject(stream: str) -> str:
    """The JetStream API subject for (batched) direct gets from a stream."""
    return f"$JS.API.DIRECT.GET.{stream}"


def stream_info_subject(stream: str) -> str:
    return f"$JS.API.STREAM.INFO.{stream}"


def stream_purge_subject(stream: str) -> str:
    return f"$JS.API.STREAM.PURGE.{stream}"


def consumer_info_subject(stream: str, consumer: str) -> str:
    return f"$JS.API.CONSUMER.INFO.{stream}.{consumer}"


# --- message ids --------------------------------------------------------------------------------
# Every Nats-Msg-Id meshflow sets derives from what the message is about, so a message published
# again (a redelivered pass, a second worker, a retry after a lost ack) is dropped by the stream's
# duplicate window instead of acting twice. Changing a format makes in-flight duplicates act twice:
# never change one.


def finished_event_id(run_id: str) -> str:
    """``meshflow/function.finished`` of a run."""
    return f"{run_id}:finished"


def failed_event_id(run_id: str) -> str:
    """``meshflow/function.failed`` of a run (starts its function's on_failure)."""
    return f"{run_id}:failed"


def cancelled_event_id(run_id: str) -> str:
    """``meshflow/function.cancelled`` of a run."""
    return f"{run_id}:cancelled"


def sent_event_id(run_id: str, step_hash: str, index: int) -> str:
    """The ``index``-th event a ``send_event`` step sends."""
    return f"{run_id}:{step_hash}:{index}"


def cron_event_id(full_id: str, cron_key: str, tick_ms: int) -> str:
    """The event of one cron tick (also its run's dedupe key)."""
    return f"cron:{full_id}:{cron_key}:{tick_ms}"


def invoked_event_id(parent_run_id: str, step_hash: str) -> str:
    """The ``meshflow/function.invoked`` event an ``invoke`` step gives its child run."""
    return f"{parent_run_id}:{step_hash}"


def start_message_id(run_id: str) -> str:
    """'Start this run': a queued, invoked or replayed run."""
    return f"{run_id}:start"


def cancel_message_id(run_id: str, revision: int | None = None) -> str:
    """'Advance this run: it was asked to stop'; per record revision when a pass ending saw a
    cancel request arrive (each request wakes the run once)."""
    return f"{run_id}:cancel" if revision is None else f"{run_id}:cancel:{revision}"


def timer_wake_id(run_id: str, key: str, until_ms: int) -> str:
    """A local timer's wake of a run, published when it cannot advance the run itself."""
    return f"{run_id}:{key}:{until_ms}"


def event_wake_id(run_id: str, step_hash: str) -> str:
    """The router resolved a run's wait."""
    return f"{run_id}:{step_hash}:event"


def invoke_wake_id(parent_run_id: str, step_hash: str) -> str:
    """A child run ended: its parent's ``invoke`` step is resolved."""
    return f"{parent_run_id}:{step_hash}:invoke"


def batch_full_id(run_id: str) -> str:
    """A batch window filled up: its run starts now."""
    return f"{run_id}:full"


def slot_wake_id(run_id: str, nonce: str) -> str:
    """A concurrency slot was freed for a queued run (each freeing wakes it once)."""
    return f"{run_id}:slot:{nonce}"


def sweep_wake_id(run_id: str, key: str, deadline_ms: int) -> str:
    """The sweeper woke a run stuck past ``deadline_ms`` on item ``key`` (once per deadline)."""
    return f"{run_id}:sweep:{key}:{deadline_ms}"
