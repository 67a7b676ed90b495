//! The connection to the JetStream cluster and the topology spoold keeps there: the names
//! derived from `jetstream.queue`, the connect with its options, the check-or-create of every
//! stream and the consumer at start (never an update), and the confirmed acknowledgements.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, ConnectOptions, HeaderMap};
use bytes::Bytes;

use crate::config::JetStreamConfig;

/// Every broker request spoold makes waits at most this long for its answer: one lost
/// request must not hold a claim, a heartbeat or a client command for longer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the client pings the server it is connected to.
const PING_INTERVAL: Duration = Duration::from_secs(3);
/// How long a dead letter or a submission may wait for a resubmission to be deduplicated:
/// the stream's duplicate window, which bounds how long `enqueue` retries one job.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long finished jobs' attempt records may linger when a host died between the
/// acknowledgement and the record's removal.
const ATTEMPTS_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);
/// How long a job's settled marker is kept. A redelivery of a settled job comes an ack wait
/// after the election that lost its acknowledgement (at most an hour by the config's bounds,
/// in practice seconds); two hours cover that with room, while the stream holds no more than
/// two hours of jobs, one small marker each. A failed run's retry marker matters for as long as
/// its backoff lasts, which two hours cover at the default `retry.backoff_max` of one hour.
const DONE_MAX_AGE: Duration = Duration::from_secs(2 * 3600);
/// How long a host's entry in the hosts stream counts as live: three of its 5 s beats.
pub const HOST_TTL: Duration = Duration::from_secs(15);
/// Jobs claimed and not settled at once across all hosts, counting jobs that wait out a retry
/// delay (they hold a slot: SPEC H1).
const MAX_ACK_PENDING: i64 = 20_000;

/// Whether `id` can be a job's ID on the broker: it becomes a token of subjects
/// (`spoold.<q>.failed.<id>`), so it must hold no `.` (another token), no `*` or `>` (a
/// wildcard, which would name every job's subject), nothing else a subject cannot hold, and
/// be safe as a file name in the scratch area: letters, digits, `-` and `_`, at most 128.
pub fn is_job_token(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The names of everything spoold keeps in the cluster for one queue.
#[derive(Debug, Clone)]
pub struct Names {
    pub queue: String,
    pub stream: String,
    pub subject: String,
    pub consumer: String,
    pub failed_stream: String,
    pub attempts_stream: String,
    pub hosts_stream: String,
    pub done_stream: String,
    /// The object store bucket of payloads too large for one message, and its stream.
    pub payloads: String,
    pub payload_stream: String,
}

impl Names {
    pub fn new(queue: &str) -> Names {
        Names {
            queue: queue.to_owned(),
            stream: format!("SPOOLD_{queue}"),
            subject: format!("spoold.{queue}.jobs"),
            consumer: "spoold".to_owned(),
            failed_stream: format!("SPOOLD_{queue}_FAILED"),
            attempts_stream: format!("SPOOLD_{queue}_ATTEMPTS"),
            hosts_stream: format!("SPOOLD_{queue}_HOSTS"),
            done_stream: format!("SPOOLD_{queue}_DONE"),
            payloads: format!("SPOOLD_{queue}_PAYLOADS"),
            // The object store's own naming: the client opens a bucket by this stream.
            payload_stream: format!("OBJ_SPOOLD_{queue}_PAYLOADS"),
        }
    }

    /// The subject of job `id`'s dead letter: one per job, so the last one is the one kept.
    pub fn failed_subject(&self, id: &str) -> String {
        format!("spoold.{}.failed.{id}", self.queue)
    }

    /// The subject of job `id`'s attempts record.
    pub fn attempts_subject(&self, id: &str) -> String {
        format!("spoold.{}.attempts.{id}", self.queue)
    }

    /// The subject of job `id`'s settled marker.
    pub fn done_subject(&self, id: &str) -> String {
        format!("spoold.{}.done.{id}", self.queue)
    }

    /// The subject of one host's liveness entry.
    pub fn host_subject(&self, host: &str) -> String {
        format!("spoold.{}.hosts.{host}", self.queue)
    }
}

/// Why the daemon could not start on the broker.
#[derive(Debug)]
pub enum BrokerError {
    /// The cluster or its JetStream could not be reached within `connect_timeout`: 69.
    Unavailable(String),
    /// The cluster holds a stream or consumer that contradicts the config, or the config's
    /// files cannot be used: 78.
    Topology(String),
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerError::Unavailable(e) => write!(f, "jetstream: {e}"),
            BrokerError::Topology(e) => write!(f, "jetstream: {e}"),
        }
    }
}

/// Connect options from the config: credentials, TLS, and a reconnect that never gives up.
pub async fn options(config: &JetStreamConfig, name: &str) -> Result<ConnectOptions, BrokerError> {
    let mut options = ConnectOptions::new()
        .name(name)
        .connection_timeout(config.connect_timeout.min(REQUEST_TIMEOUT))
        .request_timeout(Some(REQUEST_TIMEOUT))
        .max_reconnects(None)
        // A link that went dead without a reset (a cable, a firewall, a host cut off) is
        // noticed after three unanswered pings, about 9 s, instead of the default 2 minutes:
        // the host shows it in STATUS= and reconnects once the link is back.
        .ping_interval(PING_INTERVAL)
        .reconnect_delay_callback(reconnect_delay);
    if let Some(creds) = &config.creds_file {
        options = options.credentials_file(creds).await.map_err(|e| {
            BrokerError::Topology(format!(
                "jetstream.creds_file {}: {e}",
                crate::job::escape_bytes(creds.as_os_str().as_encoded_bytes())
            ))
        })?;
    }
    if let Some(ca) = &config.tls_ca_file {
        check_readable("jetstream.tls_ca_file", ca)?;
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        check_readable("jetstream.tls_cert_file", cert)?;
        check_readable("jetstream.tls_key_file", key)?;
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    Ok(options)
}

/// The pause before connection attempt `attempts` (the client counts from 1, and asks for the
/// first attempt too): none before the first, so that a client command does not wait for
/// nothing, then a backoff so that a cluster that is down is not hammered: 100 ms doubling to
/// 2 s.
fn reconnect_delay(attempts: usize) -> Duration {
    match attempts {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(100u64.saturating_mul(1 << (n - 2).min(5)).min(2000)),
    }
}

fn check_readable(key: &str, path: &std::path::Path) -> Result<(), BrokerError> {
    std::fs::File::open(path).map(drop).map_err(|e| {
        BrokerError::Topology(format!(
            "{key} {}: {e}",
            crate::job::escape_bytes(path.as_os_str().as_encoded_bytes())
        ))
    })
}

/// A Permissions Violation the server reported on a connection. The server never answers
/// the request it refused, so to whoever sent it the refusal looks like a timeout; this is
/// where the difference is kept.
pub type Denied = Arc<Mutex<Option<String>>>;

/// Keeps `event` in `denied` when it is a Permissions Violation, and says so in the log;
/// true when it was one.
pub fn note_denied(event: &async_nats::Event, denied: &Denied) -> bool {
    match event {
        async_nats::Event::ServerError(async_nats::ServerError::Other(e))
            if e.to_lowercase().contains("permissions violation") =>
        {
            tracing::error!(
                "jetstream: {e} (check the permissions of the jetstream.creds_file user)"
            );
            *denied.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
            true
        }
        _ => false,
    }
}

/// What a connection's user does with its events (a Permissions Violation aside, which
/// [`connect`] keeps in its [`Denied`]).
pub type OnEvent = Arc<dyn Fn(async_nats::Event) + Send + Sync>;

/// Connects, trying every `jetstream.servers` URL until `connect_timeout` has passed. A TLS
/// failure (a wrong CA) is not retried: waiting cannot fix it. Returns the client and where
/// its connection notes a refused request; every other event goes to `on_event`.
pub async fn connect(
    config: &JetStreamConfig,
    name: &str,
    on_event: OnEvent,
) -> Result<(Client, Denied), BrokerError> {
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    let mut last;
    let mut pause = Duration::from_millis(100);
    let denied = Denied::default();
    loop {
        let noted = denied.clone();
        let on_event = on_event.clone();
        let options = options(config, name).await?.event_callback(move |event| {
            if !note_denied(&event, &noted) {
                on_event(event);
            }
            async {}
        });
        match options.connect(config.servers.clone()).await {
            Ok(client) => return Ok((client, denied)),
            Err(e) => {
                last = e.to_string();
                if let Some(fatal) = refused(config, &e) {
                    return Err(fatal);
                }
            }
        }
        if tokio::time::Instant::now() + pause > deadline {
            return Err(BrokerError::Unavailable(format!(
                "cannot reach any of {} within jetstream.connect_timeout ({}): {last}",
                config.servers.join(", "),
                humantime::format_duration(config.connect_timeout)
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// A connect error that waiting cannot fix (TLS, credentials), worded with the settings to
/// check; None for one worth retrying (nothing listens yet, a timeout).
pub fn refused(config: &JetStreamConfig, e: &async_nats::ConnectError) -> Option<BrokerError> {
    let text = format!("{e:?} {e}").to_lowercase();
    let servers = config.servers.join(", ");
    if text.contains("tls") || text.contains("certificate") {
        return Some(BrokerError::Topology(format!(
            "cannot connect to {servers} over TLS: {e} (check jetstream.tls_ca_file, \
             tls_cert_file and tls_key_file)"
        )));
    }
    if text.contains("authorization") || text.contains("authentication") {
        return Some(BrokerError::Topology(format!(
            "the servers {servers} refused spoold's credentials: {e} (check \
             jetstream.creds_file)"
        )));
    }
    None
}

/// A JetStream context whose every request is bounded by [`REQUEST_TIMEOUT`].
pub fn context(client: &Client) -> jetstream::Context {
    let mut js = jetstream::new(client.clone());
    js.set_timeout(REQUEST_TIMEOUT);
    js
}

/// What each object of the topology must be, from the config.
struct Wanted {
    job_stream: stream::Config,
    failed_stream: stream::Config,
    attempts_stream: stream::Config,
    hosts_stream: stream::Config,
    done_stream: stream::Config,
    payload_stream: stream::Config,
    consumer: consumer::pull::Config,
}

fn wanted(names: &Names, config: &JetStreamConfig) -> Wanted {
    let file_stream = |name: &str, subjects: Vec<String>| stream::Config {
        name: name.to_owned(),
        subjects,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    };
    let q = &names.queue;
    Wanted {
        job_stream: stream::Config {
            retention: stream::RetentionPolicy::WorkQueue,
            ..file_stream(&names.stream, vec![names.subject.clone()])
        },
        failed_stream: stream::Config {
            max_messages_per_subject: 1,
            ..file_stream(&names.failed_stream, vec![format!("spoold.{q}.failed.*")])
        },
        attempts_stream: stream::Config {
            max_messages_per_subject: 1,
            max_age: ATTEMPTS_MAX_AGE,
            ..file_stream(
                &names.attempts_stream,
                vec![format!("spoold.{q}.attempts.*")],
            )
        },
        hosts_stream: stream::Config {
            max_messages_per_subject: 1,
            max_age: HOST_TTL,
            // The server refuses a duplicate window longer than the max age.
            duplicate_window: HOST_TTL,
            ..file_stream(&names.hosts_stream, vec![format!("spoold.{q}.hosts.*")])
        },
        done_stream: stream::Config {
            max_messages_per_subject: 1,
            max_age: DONE_MAX_AGE,
            allow_direct: true,
            ..file_stream(&names.done_stream, vec![format!("spoold.{q}.done.*")])
        },
        // The layout the client's object store expects (what `create_object_store` makes),
        // created as a plain stream like the others so that it is checked the same way. No
        // max age: an object lives as long as its job, which may wait in the dead-letter
        // stream for good; spoold deletes it when the job is done.
        payload_stream: stream::Config {
            subjects: vec![
                format!("$O.{}.C.>", names.payloads),
                format!("$O.{}.M.>", names.payloads),
            ],
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            allow_direct: true,
            ..file_stream(&names.payload_stream, Vec::new())
        },
        consumer: consumer::pull::Config {
            durable_name: Some(names.consumer.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            // No server-side limit: a job's attempts are counted by spoold (a redelivery after
            // a stop or a lost host does not count), and an exhausted max_deliver would leave
            // the job invisible in the stream (SPEC H2).
            max_deliver: -1,
            max_ack_pending: MAX_ACK_PENDING,
            max_waiting: 512,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        },
    }
}

/// Makes sure every stream and the consumer exist as the config says: each missing one is
/// created; an existing one whose settings spoold owns differ is refused, never updated (on
/// these servers a "create" with other settings updates a consumer that every host shares).
/// Errors from the cluster are `Unavailable`; a contradiction is `Topology`.
pub async fn ensure_topology(
    js: &jetstream::Context,
    names: &Names,
    config: &JetStreamConfig,
) -> Result<(), BrokerError> {
    let want = wanted(names, config);
    for stream_config in [
        &want.job_stream,
        &want.failed_stream,
        &want.attempts_stream,
        &want.hosts_stream,
        &want.done_stream,
        &want.payload_stream,
    ] {
        ensure_stream(js, stream_config).await?;
    }
    let job_stream = js
        .get_stream_no_info(&names.stream)
        .await
        .map_err(|e| BrokerError::Unavailable(format!("stream {}: {e}", names.stream)))?;
    match job_stream.consumer_info(&names.consumer).await {
        Ok(info) => check_consumer(names, &info.config, &want.consumer),
        Err(e) if is_not_found(&e.to_string(), "consumer") => job_stream
            .create_consumer(want.consumer.clone())
            .await
            .map(drop)
            .map_err(|e| {
                BrokerError::Unavailable(format!(
                    "cannot create the consumer {}/{}: {e}",
                    names.stream, names.consumer
                ))
            }),
        Err(e) => Err(BrokerError::Unavailable(format!(
            "consumer {}/{}: {e}",
            names.stream, names.consumer
        ))),
    }
}

fn is_not_found(error: &str, what: &str) -> bool {
    let error = error.to_lowercase();
    error.contains(&format!("{what} not found"))
        || error.contains("10059")
        || error.contains("10014")
}

async fn ensure_stream(js: &jetstream::Context, want: &stream::Config) -> Result<(), BrokerError> {
    match js.get_stream(&want.name).await {
        Ok(mut s) => {
            let info = s
                .info()
                .await
                .map_err(|e| BrokerError::Unavailable(format!("stream {}: {e}", want.name)))?;
            check_stream(&info.config, want)
        }
        Err(e) if is_not_found(&e.to_string(), "stream") => {
            js.create_stream(want.clone()).await.map(drop).map_err(|e| {
                BrokerError::Unavailable(format!("cannot create the stream {}: {e}", want.name))
            })
        }
        Err(e) => Err(BrokerError::Unavailable(format!(
            "stream {}: {e}",
            want.name
        ))),
    }
}

fn mismatch(what: &str, field: &str, has: String, config_says: String, key: &str) -> BrokerError {
    BrokerError::Topology(format!(
        "{what} has {field} {has}, the config says {config_says} ({key}); change one of them: \
         spoold does not update a stream or consumer that other hosts share"
    ))
}

fn check_stream(has: &stream::Config, want: &stream::Config) -> Result<(), BrokerError> {
    // The payload bucket is named as `nats object` shows it, with the stream behind it.
    let what = match want.name.strip_prefix("OBJ_") {
        Some(bucket) => format!("object store {bucket} (stream {})", want.name),
        None => format!("stream {}", want.name),
    };
    if has.num_replicas != want.num_replicas {
        return Err(mismatch(
            &what,
            "replicas",
            has.num_replicas.to_string(),
            want.num_replicas.to_string(),
            "jetstream.replicas",
        ));
    }
    if has.retention != want.retention {
        return Err(mismatch(
            &what,
            "retention",
            format!("{:?}", has.retention),
            format!("{:?}", want.retention),
            "spoold's own topology; another program uses this name",
        ));
    }
    // Settled markers are read from any current replica; a stream that refuses direct reads
    // would fail every delivery's read, and the jobs would pile up unsettled.
    if want.allow_direct && !has.allow_direct {
        return Err(mismatch(
            &what,
            "allow_direct",
            "false".into(),
            "true".into(),
            "spoold's own topology; another program made this stream",
        ));
    }
    if has.subjects != want.subjects {
        return Err(mismatch(
            &what,
            "subjects",
            format!("{:?}", has.subjects),
            format!("{:?}", want.subjects),
            "jetstream.queue",
        ));
    }
    Ok(())
}

fn check_consumer(
    names: &Names,
    has: &consumer::Config,
    want: &consumer::pull::Config,
) -> Result<(), BrokerError> {
    let what = format!("consumer {}/{}", names.stream, names.consumer);
    let show = |d: Duration| humantime::format_duration(d).to_string();
    if has.ack_wait != want.ack_wait {
        return Err(mismatch(
            &what,
            "ack_wait",
            show(has.ack_wait),
            show(want.ack_wait),
            "jetstream.ack_wait",
        ));
    }
    if has.ack_policy != want.ack_policy || has.max_deliver != want.max_deliver {
        return Err(mismatch(
            &what,
            "ack_policy/max_deliver",
            format!("{:?}/{}", has.ack_policy, has.max_deliver),
            format!("{:?}/{}", want.ack_policy, want.max_deliver),
            "spoold's own topology; another program uses this consumer",
        ));
    }
    if !has.filter_subject.is_empty() || has.deliver_subject.is_some() {
        return Err(BrokerError::Topology(format!(
            "{what} is not spoold's (it has a filter or is a push consumer); remove it or \
             choose another jetstream.queue"
        )));
    }
    Ok(())
}

/// Sends `body` to a delivery's reply subject and waits for the server's answer: an
/// acknowledgement that is known to have arrived.
pub async fn confirmed(client: &Client, reply: &str, body: &'static [u8]) -> Result<(), String> {
    confirmed_bytes(client, reply, Bytes::from_static(body)).await
}

pub async fn confirmed_bytes(client: &Client, reply: &str, body: Bytes) -> Result<(), String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, client.request(reply.to_owned(), body)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within the request timeout".to_owned()),
    }
}

/// The negative acknowledgement that redelivers after `delay` (at once when zero).
pub fn nak(delay: Duration) -> Bytes {
    if delay.is_zero() {
        Bytes::from_static(b"-NAK")
    } else {
        Bytes::from(format!("-NAK {{\"delay\":{}}}", delay.as_nanos()))
    }
}

/// The header value of `name`, as text.
pub fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_without_direct_reads_is_refused_where_they_are_wanted() {
        let names = Names::new("mail");
        let config: crate::config::JetStreamConfig =
            toml::from_str("servers = [\"nats://a\"]").unwrap();
        let want = wanted(&names, &config);
        assert!(check_stream(&want.done_stream, &want.done_stream).is_ok());
        let old = stream::Config {
            allow_direct: false,
            ..want.done_stream.clone()
        };
        let e = check_stream(&old, &want.done_stream)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("stream SPOOLD_mail_DONE has allow_direct false"),
            "{e}"
        );
        // A stream that need not be read directly may allow it or not.
        let jobs = stream::Config {
            allow_direct: true,
            ..want.job_stream.clone()
        };
        assert!(check_stream(&jobs, &want.job_stream).is_ok());
    }

    #[test]
    fn names_follow_the_queue() {
        let n = Names::new("mail");
        assert_eq!(n.stream, "SPOOLD_mail");
        assert_eq!(n.subject, "spoold.mail.jobs");
        assert_eq!(n.failed_subject("01J"), "spoold.mail.failed.01J");
        assert_eq!(n.attempts_subject("01J"), "spoold.mail.attempts.01J");
        assert_eq!(n.payloads, "SPOOLD_mail_PAYLOADS");
        assert_eq!(n.payload_stream, "OBJ_SPOOLD_mail_PAYLOADS");
    }

    #[test]
    fn the_first_connection_attempt_does_not_wait() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3), Duration::from_millis(200));
        assert_eq!(reconnect_delay(40), Duration::from_secs(2));
    }

    #[test]
    fn a_nak_carries_its_delay_in_nanoseconds() {
        assert_eq!(&nak(Duration::ZERO)[..], b"-NAK");
        assert_eq!(
            &nak(Duration::from_millis(1500))[..],
            b"-NAK {\"delay\":1500000000}"
        );
    }
}
