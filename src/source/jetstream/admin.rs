//! The client commands against a JetStream queue: `enqueue` (a publish with the job ID as
//! `Nats-Msg-Id`, retried through an election), `status`, `failed` (the dead-letter stream)
//! and `retry`. Each command runs its own current-thread runtime for the NATS client; it
//! takes no lock and works from any host.

use std::cell::RefCell;
use std::ffi::OsString;
use std::io::{self, Read};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;

use super::broker::{self, BrokerError, DUPLICATE_WINDOW, Names, REQUEST_TIMEOUT, header};
use super::payload::{self, ObjectRef};
use super::record::Record;
use super::{GENERATION_HEADER, ID_HEADER, RECORD_HEADER};
use crate::config::Config;
use crate::job::{History, JobId};
use crate::source::Admin;
use crate::source::admin::{
    Counts, FailedJob, Moved, Operation, OperatorError, Partial, Paused, Place, PublishError,
    Queued, Retried, RunningJob, ShownJob, Submission, SubmitError,
};

/// Room left in a message for spoold's headers: a payload up to the server's `max_payload`
/// less this travels in the job's message; a larger one goes to the object store.
const HEADER_ROOM: usize = 4096;
/// Pauses between two publishes of one job while the cluster does not answer.
const PUBLISH_PAUSE: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(1));

pub struct BrokerAdmin {
    runtime: tokio::runtime::Runtime,
    client: Client,
    js: jetstream::Context,
    names: Names,
    servers: String,
    /// The jobs `stage` took and `publish` has not published yet, in order: the body of each,
    /// or the object already stored for it.
    staged: RefCell<Vec<(String, Bytes, Option<ObjectRef>)>>,
}

impl BrokerAdmin {
    /// Connects (waiting up to `connect_timeout`) and makes sure the topology is there.
    pub fn connect(config: &Config) -> Result<BrokerAdmin, BrokerError> {
        let js_config = config
            .jetstream
            .as_ref()
            .expect("backend.kind = \"jetstream\" has a [jetstream] table (config check)");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BrokerError::Unavailable(format!("cannot start a runtime: {e}")))?;
        let names = Names::new(&js_config.queue);
        let (client, js) = runtime.block_on(async {
            let (client, denied) =
                broker::connect(js_config, "spoold client", std::sync::Arc::new(|_| {})).await?;
            let js = broker::context(&client);
            // Retried through an election until connect_timeout, as the daemon does.
            super::topology(&js, &names, js_config, &denied).await?;
            Ok::<_, BrokerError>((client, js))
        })?;
        Ok(BrokerAdmin {
            runtime,
            client,
            js,
            names,
            servers: js_config.servers.join(","),
            staged: RefCell::new(Vec::new()),
        })
    }

    async fn stream(&self, name: &str) -> io::Result<stream::Stream> {
        self.js.get_stream(name).await.map_err(other)
    }

    /// Every message of `stream`, oldest first (dead letters and hosts are few).
    async fn all_messages(&self, name: &str) -> io::Result<Vec<StreamMessage>> {
        let mut stream = self.stream(name).await?;
        let info = stream.info().await.map_err(other)?.clone();
        let mut out = Vec::new();
        if info.state.messages == 0 {
            return Ok(out);
        }
        for seq in info.state.first_sequence..=info.state.last_sequence {
            match stream.get_raw_message(seq).await {
                Ok(m) => out.push(m),
                Err(e) if matches!(e.kind(), stream::RawMessageErrorKind::NoMessageFound) => {}
                Err(e) => return Err(other(e)),
            }
        }
        Ok(out)
    }

    /// The hosts consuming now: their entries of the last few seconds.
    fn hosts(&self) -> io::Result<Vec<serde_json::Value>> {
        self.runtime.block_on(async {
            let messages = self.all_messages(&self.names.hosts_stream).await?;
            Ok(messages
                .into_iter()
                .filter_map(|m| serde_json::from_slice(&m.payload).ok())
                .collect())
        })
    }

    /// `spoold status [--json]`: the same keys as for a spool, plus the hosts consuming.
    pub fn print_status(&self, json: bool) -> io::Result<()> {
        let counts = self.counts()?;
        let hosts = self.hosts()?;
        if json {
            let mut value = serde_json::to_value(&counts)?;
            value["hosts"] = serde_json::Value::Array(hosts);
            value["backend"] = "jetstream".into();
            println!("{value}");
            return Ok(());
        }
        let (kind, address) = self.address();
        println!("{kind} {address}");
        let age = counts
            .oldest_queued_age_s
            .map(|a| {
                format!(
                    " (oldest waiting {})",
                    humantime::format_duration(Duration::from_secs(a as u64))
                )
            })
            .unwrap_or_default();
        println!("queued  {}{age}", counts.queued);
        println!("active  {}", counts.active);
        println!("retry   {}", counts.retry);
        println!(
            "done    {} (by the hosts running now, since each started)",
            counts.done
        );
        println!("failed  {}", counts.failed);
        println!("hosts   {}", hosts.len());
        for h in &hosts {
            println!(
                "        {} workers {} busy {} done {} since {}",
                h["host"].as_str().unwrap_or("?"),
                h["workers"],
                h["busy"],
                h["done"],
                h["started_at"].as_str().unwrap_or("?")
            );
        }
        Ok(())
    }

    async fn publish_job(
        &self,
        msg_id: &str,
        id: &str,
        generation: u32,
        body: Bytes,
        object: Option<&ObjectRef>,
    ) -> io::Result<()> {
        let now = tokio::time::Instant::now();
        self.publish_job_since(msg_id, id, generation, body, object, now)
            .await
    }

    /// [`publish_job`](Self::publish_job) for a job first published at `since`: the duplicate
    /// window runs from then, so the tries stop half a window after it.
    async fn publish_job_since(
        &self,
        msg_id: &str,
        id: &str,
        generation: u32,
        body: Bytes,
        object: Option<&ObjectRef>,
        since: tokio::time::Instant,
    ) -> io::Result<()> {
        let mut headers = job_headers(msg_id, id, generation);
        if let Some(object) = object {
            object.add_to(&mut headers);
        }
        // The same Nats-Msg-Id every time: the stream keeps one copy whichever publish
        // landed, so a retry after a lost answer is no duplicate. Bounded by half the
        // duplicate window from the first publish, inside which that holds.
        through_elections(since + DUPLICATE_WINDOW / 2, || async {
            let ack = self
                .js
                .publish_with_headers(self.names.subject.clone(), headers.clone(), body.clone())
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map(drop).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| {
            io::Error::other(format!(
                "the cluster did not acknowledge it within {} of its first publish (it may be \
                 queued all the same: see `spoold status`): {e}",
                humantime::format_duration(DUPLICATE_WINDOW / 2)
            ))
        })
    }

    /// Submits a payload too large for one message: it is stored whole as object `id` first,
    /// and only then is the job published, referring to it, so that no job ever exists without
    /// its payload. A crash or a failure in between leaves an orphan object, which is not
    /// deleted here: a publish whose acknowledgement was lost may have queued the job after
    /// all, and its object must then be there when it runs.
    async fn submit_object(&self, id: &str, body: &[u8]) -> io::Result<()> {
        let object = self.store_object(id, body).await?;
        self.publish_job(id, id, 0, Bytes::new(), Some(&object))
            .await
    }

    /// Reads a job from `src`: a body small enough for one message is kept in memory; a larger
    /// one is read whole and stored as object `id` now, before any message names it (a try
    /// that fails is made again from the start, which a stream such as stdin cannot replay).
    fn read_payload(&self, src: &mut dyn Read, id: &str) -> io::Result<(Bytes, Option<ObjectRef>)> {
        let limit = (self.client.server_info().max_payload).saturating_sub(HEADER_ROOM);
        let mut body = Vec::new();
        src.take(limit as u64 + 1).read_to_end(&mut body)?;
        if body.len() <= limit {
            return Ok((body.into(), None));
        }
        src.read_to_end(&mut body)?;
        let object = self.runtime.block_on(self.store_object(id, &body))?;
        Ok((Bytes::new(), Some(object)))
    }

    /// Stores `body` as object `id`, tried again through an election as a publish is, for at
    /// most half the duplicate window; each try replaces what an earlier one stored.
    async fn store_object(&self, id: &str, body: &[u8]) -> io::Result<ObjectRef> {
        let give_up = tokio::time::Instant::now() + DUPLICATE_WINDOW / 2;
        through_elections(give_up, || async {
            payload::store(&self.js, &self.names, id, body)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| {
            io::Error::other(format!(
                "{e} (gave up after {})",
                humantime::format_duration(DUPLICATE_WINDOW / 2)
            ))
        })
    }

    /// Submits many jobs with up to [`IN_FLIGHT`] publishes awaiting their acknowledgement at
    /// once (one at a time, each publish waits a round trip of the cluster's replication).
    /// `next` gives each job's ID and bytes (or why it cannot be read); `done` is told each
    /// job's fate, in the order given. A publish whose acknowledgement fails is retried alone,
    /// with the same `Nats-Msg-Id`, as `submit` does.
    pub fn submit_many(
        &self,
        mut next: impl FnMut() -> Option<(String, io::Result<Vec<u8>>)>,
        mut done: impl FnMut(&str, io::Result<()>),
    ) {
        let limit = self
            .client
            .server_info()
            .max_payload
            .saturating_sub(HEADER_ROOM);
        self.runtime.block_on(async {
            let mut in_flight = std::collections::VecDeque::new();
            loop {
                let job = next();
                let Some((id, body)) = job else { break };
                let pending = match body {
                    // Too large for one message: stored and published before the next job,
                    // and settled in order with the others.
                    Ok(body) if body.len() > limit => {
                        Err(self.submit_object(&id, &body).await.err())
                    }
                    Ok(body) => {
                        let body = Bytes::from(body);
                        let headers = job_headers(&id, &id, 0);
                        let at = tokio::time::Instant::now();
                        let sent = self
                            .js
                            .publish_with_headers(self.names.subject.clone(), headers, body.clone())
                            .await;
                        Ok((body, sent.ok(), at))
                    }
                    Err(e) => Err(Some(e)),
                };
                in_flight.push_back((id, pending));
                if in_flight.len() >= IN_FLIGHT {
                    let (id, pending) = in_flight.pop_front().expect("one in flight");
                    let result = self.settle_publish(&id, pending).await;
                    done(&id, result);
                }
            }
            while let Some((id, pending)) = in_flight.pop_front() {
                let result = self.settle_publish(&id, pending).await;
                done(&id, result);
            }
        });
    }

    /// Waits for the acknowledgement of a publish made at `sent`, or publishes again. The
    /// answer is awaited until `REQUEST_TIMEOUT` after the publish, not after the await: the
    /// acknowledgements are awaited one after the other, and when a leader's death loses them
    /// all, each would otherwise cost a whole timeout in turn, and the later jobs' tries would
    /// run past the duplicate window that keeps a resubmission from being stored twice.
    async fn settle_publish(&self, id: &str, pending: Pending) -> io::Result<()> {
        let (body, ack, sent) = match pending {
            Ok(sent) => sent,
            Err(None) => return Ok(()),
            Err(Some(e)) => return Err(e),
        };
        if let Some(ack) = ack
            && let Ok(Ok(_)) = tokio::time::timeout_at(sent + REQUEST_TIMEOUT, ack).await
        {
            return Ok(());
        }
        self.publish_job_since(id, id, 0, body, None, sent).await
    }

    async fn purge_subject(&self, stream: &str, subject: String) -> io::Result<()> {
        let stream = self.js.get_stream_no_info(stream).await.map_err(other)?;
        stream
            .purge()
            .filter(subject)
            .await
            .map(drop)
            .map_err(other)
    }
}

/// The headers of a job's message. A first submission carries only its `Nats-Msg-Id`, which
/// is its ID: the daemon reads the ID from there when `Spoold-Id` is absent, and the generation
/// is then 0. A resubmission's `Nats-Msg-Id` has a generation suffix, so it also names the job
/// and its generation. Nothing more is sent: each header costs the client and every server a
/// parse per message, and the time a job was submitted is the message's own timestamp.
fn job_headers(msg_id: &str, id: &str, generation: u32) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    if generation > 0 || msg_id != id {
        headers.insert(ID_HEADER, id);
        headers.insert(GENERATION_HEADER, generation.to_string().as_str());
    }
    headers
}

/// Runs `op` until it succeeds, trying again after a pause that doubles (an election takes
/// 4-7 s), until a try would end past `give_up`; then the last error.
async fn through_elections<T, F, Fut>(give_up: tokio::time::Instant, mut op: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut pause = PUBLISH_PAUSE.0;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(e) if tokio::time::Instant::now() + pause > give_up => return Err(e),
            Err(e) => {
                tracing::debug!("{e}; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(PUBLISH_PAUSE.1);
            }
        }
    }
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn unsupported(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("{what} is not available with backend.kind = \"jetstream\""),
    )
}

/// How many publishes `submit_many` keeps awaiting their acknowledgement.
const IN_FLIGHT: usize = 256;

/// A job of `submit_many` on its way: its body and the acknowledgement it awaits, or its
/// end already known (`Err(None)`: submitted; `Err(Some)`: not submitted, and why).
type Pending = Result<
    (
        Bytes,
        Option<jetstream::context::PublishAckFuture>,
        tokio::time::Instant,
    ),
    Option<io::Error>,
>;

impl Admin for BrokerAdmin {
    fn address(&self) -> (&'static str, String) {
        (
            "jetstream",
            format!("{} queue {}", self.servers, self.names.queue),
        )
    }

    fn submit(&self, src: &mut dyn Read, id: &str, _partial: &Partial) -> Result<(), SubmitError> {
        // A message is published whole or not at all, so there is nothing to undo.
        let (body, object) = self.read_payload(src, id)?;
        self.runtime
            .block_on(self.publish_job(id, id, 0, body, object.as_ref()))
            .map_err(SubmitError::Io)
    }

    /// Nothing of a staged job is visible to a daemon until `publish`: its message is only
    /// held here (a large payload's object is stored already, and is an orphan should the
    /// command die before it publishes).
    fn stage(
        &self,
        src: &mut dyn Read,
        id: &str,
        _partial: &Partial,
        _submission: &Submission,
    ) -> Result<(), SubmitError> {
        let (body, object) = self.read_payload(src, id)?;
        self.staged.borrow_mut().push((id.to_owned(), body, object));
        Ok(())
    }

    fn publish(
        &self,
        ids: &[String],
        _partial: &Partial,
        _submission: &Submission,
    ) -> Result<(), PublishError> {
        let staged = std::mem::take(&mut *self.staged.borrow_mut());
        for (published, id) in ids.iter().enumerate() {
            let Some((_, body, object)) = staged.iter().find(|(s, ..)| s == id) else {
                return Err(PublishError::Io {
                    err: io::Error::other(format!("job {id} was not staged")),
                    published,
                });
            };
            self.runtime
                .block_on(self.publish_job(id, id, 0, body.clone(), object.as_ref()))
                .map_err(|err| PublishError::Io { err, published })?;
        }
        Ok(())
    }

    fn counts(&self) -> io::Result<Counts> {
        self.runtime.block_on(async {
            let mut jobs = self.stream(&self.names.stream).await?;
            let info = jobs.info().await.map_err(other)?.clone();
            let mut consumer: jetstream::consumer::PullConsumer = jobs
                .get_consumer(&self.names.consumer)
                .await
                .map_err(other)?;
            let consumer = consumer.info().await.map_err(other)?.clone();
            let mut failed = self.stream(&self.names.failed_stream).await?;
            let failed = failed.info().await.map_err(other)?.state.messages;
            let hosts = self.all_messages(&self.names.hosts_stream).await?;
            let (mut busy, mut done) = (0u64, 0u64);
            for h in hosts
                .iter()
                .filter_map(|m| serde_json::from_slice::<serde_json::Value>(&m.payload).ok())
            {
                busy += h["busy"].as_u64().unwrap_or(0);
                done += h["done"].as_u64().unwrap_or(0);
            }
            let ack_pending = consumer.num_ack_pending as u64;
            let active = busy.min(ack_pending);
            let oldest = (info.state.messages > 0).then(|| {
                let first = info.state.first_timestamp.unix_timestamp_nanos();
                let now = time_now_nanos();
                ((now - first).max(0) as f64) / 1e9
            });
            Ok(Counts {
                queued: consumer.num_pending,
                active,
                retry: ack_pending - active,
                done,
                failed,
                oldest_queued_age_s: oldest,
                ..Counts::default()
            })
        })
    }

    fn failed(&self) -> io::Result<Vec<FailedJob>> {
        let messages = self
            .runtime
            .block_on(self.all_messages(&self.names.failed_stream))?;
        let mut jobs: Vec<FailedJob> = messages
            .iter()
            .map(|m| {
                let headers = Some(&m.headers);
                let id = header(headers, ID_HEADER)
                    .map(str::to_owned)
                    .unwrap_or_else(|| m.subject.rsplit('.').next().unwrap_or("").to_owned());
                let history = header(headers, RECORD_HEADER)
                    .and_then(|r| serde_json::from_str::<Record>(r).ok())
                    .map(History::from);
                let payload = ObjectRef::of(headers).map(|object| {
                    let size = object
                        .size
                        .map(|n| format!(", {n} bytes"))
                        .unwrap_or_default();
                    format!(
                        "object {:?} in the bucket {}{size}",
                        object.name, self.names.payloads
                    )
                });
                FailedJob {
                    name: OsString::from(id),
                    history,
                    payload,
                }
            })
            .collect();
        jobs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(jobs)
    }

    fn refuses(&self, id: &JobId) -> Option<String> {
        let ok = id.as_os_str().to_str().is_some_and(broker::is_job_token);
        (!ok).then(|| {
            "a job ID on the broker holds only letters, digits, `-` and `_` (at most 128)".into()
        })
    }

    fn retry(&self, id: &JobId) -> io::Result<Retried> {
        // Checked again here, whoever calls: the ID becomes a token of subjects, where a `*`
        // or a `>` would name every job's dead letter and record.
        let Some(id) = id
            .as_os_str()
            .to_str()
            .filter(|id| broker::is_job_token(id))
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a job ID of the broker's queue (letters, digits, `-` and `_` only)",
            ));
        };
        self.runtime.block_on(async {
            let stream = self
                .js
                .get_stream_no_info(&self.names.failed_stream)
                .await
                .map_err(other)?;
            let letter = match stream
                .get_last_raw_message_by_subject(&self.names.failed_subject(id))
                .await
            {
                Ok(m) => m,
                Err(e)
                    if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound)
                        || e.to_string().contains("invalid subject") =>
                {
                    return Ok(Retried::NoSuchJob);
                }
                Err(e) => return Err(other(e)),
            };
            let generation = header(Some(&letter.headers), GENERATION_HEADER)
                .and_then(|g| g.parse::<u32>().ok())
                .unwrap_or(0)
                + 1;
            // A fresh count: the old record goes before the job comes back.
            self.purge_subject(&self.names.attempts_stream, self.names.attempts_subject(id))
                .await?;
            // A new Nats-Msg-Id per generation: the first submission's ID may still be inside
            // the duplicate window, which would swallow this one.
            // A job whose payload is an object refers to the same object again: it stayed
            // when the job was dead-lettered.
            let object = ObjectRef::of(Some(&letter.headers));
            self.publish_job(
                &format!("{id}.g{generation}"),
                id,
                generation,
                letter.payload,
                object.as_ref(),
            )
            .await?;
            crate::fault::retry_pause();
            // Only this dead letter and older ones go: the job may already have run and
            // failed again, and its new dead letter must stay. Tried again through an election,
            // since a dead letter left behind would be retried a second time and, past the
            // duplicate window, queued twice.
            let give_up = tokio::time::Instant::now() + DUPLICATE_WINDOW / 2;
            through_elections(give_up, || async {
                let stream = self
                    .js
                    .get_stream_no_info(&self.names.failed_stream)
                    .await
                    .map_err(|e| e.to_string())?;
                stream
                    .purge()
                    .filter(self.names.failed_subject(id))
                    .sequence(letter.sequence + 1)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| {
                io::Error::other(format!(
                    "{id} is back in the queue, but its dead letter could not be removed ({e}): \
                     `spoold failed` still lists it; do not retry it again until it is gone, or \
                     it may run twice"
                ))
            })?;
            Ok(Retried::Queued {
                name: OsString::from(id),
                place: Place::named("the queue"),
            })
        })
    }

    fn paused(&self) -> io::Result<Option<Paused>> {
        Ok(None)
    }

    fn running(&self) -> io::Result<Vec<RunningJob>> {
        Err(unsupported("top"))
    }

    fn oldest_queued(&self) -> io::Result<Option<Queued>> {
        Err(unsupported("top"))
    }

    /// No daemon reads a record from a broker client yet, so an action the caller carried out
    /// itself (a `retry` republishes the job, visible in the streams) is left at that; an
    /// action that needs a daemon to carry it out is refused.
    fn record_operation(
        &self,
        op: Operation,
        _reason: Option<&str>,
        _done: &[JobId],
        asked: &[JobId],
    ) -> Result<(), OperatorError> {
        if asked.is_empty() {
            Ok(())
        } else {
            Err(unsupported(op.name()).into())
        }
    }

    fn pause(&self, _reason: Option<&str>) -> Result<(Paused, bool), OperatorError> {
        Err(unsupported("pause").into())
    }

    fn resume(&self) -> Result<bool, OperatorError> {
        Err(unsupported("resume").into())
    }

    fn hold(&self, _id: &JobId) -> Result<Moved, OperatorError> {
        Err(unsupported("hold").into())
    }

    fn release(&self, _id: &JobId) -> Result<Moved, OperatorError> {
        Err(unsupported("release").into())
    }

    fn waiting(&self) -> io::Result<Vec<JobId>> {
        Err(unsupported("listing the waiting jobs"))
    }

    fn held(&self) -> io::Result<Vec<JobId>> {
        Err(unsupported("hold"))
    }

    fn cancel(&self, _id: &JobId) -> Result<bool, OperatorError> {
        Err(unsupported("cancel").into())
    }

    fn show(&self, _id: &JobId) -> io::Result<Option<ShownJob>> {
        Err(unsupported("show"))
    }
}

fn time_now_nanos() -> i128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

impl BrokerError {
    /// The exit status a command or the daemon ends with: 69 (EX_UNAVAILABLE) for a cluster
    /// that cannot be reached, 78 (EX_CONFIG) for one that contradicts the config.
    pub fn exit_code(&self) -> u8 {
        match self {
            BrokerError::Unavailable(_) => 69,
            BrokerError::Topology(_) => crate::config::EX_CONFIG,
        }
    }
}
