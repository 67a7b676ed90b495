//! Payloads too large for one message: each is an object in the queue's object store bucket
//! (`SPOOLD_<q>_PAYLOADS`), named by its job message's headers; this module stores one at
//! submission, streams one into the handler's file at delivery, and deletes one once its job
//! is done.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use async_nats::jetstream::object_store::GetErrorKind;
use tokio::io::AsyncReadExt as _;
use tokio_util::sync::CancellationToken;

use super::broker::{Names, REQUEST_TIMEOUT, header};

/// `object` when the payload is an object, absent (or `inline`) when it is the body.
pub const PAYLOAD_HEADER: &str = "Spoold-Payload";
/// The object's name in the bucket.
pub const OBJECT_HEADER: &str = "Spoold-Object";
/// The object's size in bytes, checked after it is read.
pub const SIZE_HEADER: &str = "Spoold-Size";

/// The object a job message refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub name: String,
    pub size: Option<u64>,
}

impl ObjectRef {
    /// The object a message's headers name, or None for an inline payload.
    pub fn of(headers: Option<&HeaderMap>) -> Option<ObjectRef> {
        if header(headers, PAYLOAD_HEADER) != Some("object") {
            return None;
        }
        Some(ObjectRef {
            name: header(headers, OBJECT_HEADER).unwrap_or("").to_owned(),
            size: header(headers, SIZE_HEADER).and_then(|s| s.parse().ok()),
        })
    }

    /// Adds the headers that name this object to a job message (or its dead letter).
    pub fn add_to(&self, headers: &mut HeaderMap) {
        headers.insert(PAYLOAD_HEADER, "object");
        headers.insert(OBJECT_HEADER, self.name.as_str());
        if let Some(size) = self.size {
            headers.insert(SIZE_HEADER, size.to_string().as_str());
        }
    }

    /// How logs and dead letters name the object: `BUCKET/NAME`.
    pub fn shown(&self, names: &Names) -> String {
        format!("{}/{}", names.payloads, self.name)
    }
}

/// How streaming an object into the handler's file ended.
#[derive(Debug)]
pub enum Fetched {
    /// The file holds the whole object, its size and digest checked.
    Whole,
    /// The object is not in the bucket: the job cannot ever run.
    Missing(String),
    /// The object's bytes do not match its size or digest: the job cannot ever run.
    Damaged(String),
    /// The stop came first; the partial file is gone.
    Stopped,
    /// The cluster did not answer (an election, a lost connection): worth another try.
    Failed(String),
}

/// Streams the object `object` names into a new file at `path` (mode 0640), one chunk in
/// memory at a time. Every read waits at most the request timeout and also ends at `stop`, so
/// that neither a large object nor a silent cluster holds a stop. Anything but `Whole` leaves
/// no file behind.
pub async fn fetch(
    js: &jetstream::Context,
    names: &Names,
    object: &ObjectRef,
    path: &Path,
    stop: &CancellationToken,
) -> Fetched {
    let fetched = tokio::select! {
        biased;
        () = stop.cancelled() => Fetched::Stopped,
        fetched = fetch_into(js, names, object, path) => fetched,
    };
    if !matches!(fetched, Fetched::Whole)
        && let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove {}: {e}", path.display());
    }
    fetched
}

async fn fetch_into(
    js: &jetstream::Context,
    names: &Names,
    object: &ObjectRef,
    path: &Path,
) -> Fetched {
    let shown = object.shown(names);
    let bucket = match bounded(js.get_object_store(&names.payloads)).await {
        Ok(bucket) => bucket,
        Err(e) => return Fetched::Failed(format!("object store {}: {e}", names.payloads)),
    };
    if object.name.is_empty() {
        return Fetched::Missing(format!("the job names no payload object ({OBJECT_HEADER})"));
    }
    let got = tokio::time::timeout(REQUEST_TIMEOUT, bucket.get(&object.name)).await;
    let mut reader = match got {
        Ok(Ok(reader)) => reader,
        // Nothing a later try could change: the job cannot run on what it names.
        Ok(Err(e))
            if matches!(
                e.kind(),
                GetErrorKind::NotFound | GetErrorKind::InvalidName | GetErrorKind::BucketLink
            ) =>
        {
            return Fetched::Missing(format!("payload object {shown} missing"));
        }
        Ok(Err(e)) => return Fetched::Failed(format!("payload object {shown}: {e}")),
        Err(_) => return Fetched::Failed(format!("payload object {shown}: no answer")),
    };
    let mut file = match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(path)
    {
        Ok(file) => file,
        Err(e) => return Fetched::Failed(format!("cannot create {}: {e}", path.display())),
    };
    let mut buf = Vec::with_capacity(128 * 1024);
    let mut size = 0u64;
    loop {
        buf.clear();
        // A stop drops this whole future (see `fetch`), so each read waits on it too.
        match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_buf(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                size += n as u64;
                // A chunk into the page cache: well under a millisecond, so a plain write on
                // the main runtime does not hold it.
                if let Err(e) = file.write_all(&buf[..n]) {
                    return Fetched::Failed(format!("cannot write {}: {e}", path.display()));
                }
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                return Fetched::Damaged(format!("payload object {shown} damaged: {e}"));
            }
            Ok(Err(e)) => return Fetched::Failed(format!("payload object {shown}: {e}")),
            Err(_) => {
                return Fetched::Failed(format!(
                    "payload object {shown}: no chunk within {}",
                    humantime::format_duration(REQUEST_TIMEOUT)
                ));
            }
        }
    }
    match object.size {
        Some(want) if want != size => Fetched::Damaged(format!(
            "payload object {shown} damaged: {size} bytes, the job says {want}"
        )),
        _ => Fetched::Whole,
    }
}

/// Stores `data` as object `name`; the answer is the object's reference, for the job's
/// headers. An object of that name is replaced.
pub async fn store(
    js: &jetstream::Context,
    names: &Names,
    name: &str,
    mut data: &[u8],
) -> Result<ObjectRef, String> {
    let bucket = bounded(js.get_object_store(&names.payloads))
        .await
        .map_err(|e| format!("object store {}: {e}", names.payloads))?;
    let info = bucket.put(name, &mut data).await.map_err(|e| {
        format!(
            "cannot store the payload as object {}/{name}: {e}",
            names.payloads
        )
    })?;
    Ok(ObjectRef {
        name: name.to_owned(),
        size: Some(info.size as u64),
    })
}

/// Deletes object `name` whole: its chunks, then its entry, so that not even the deletion
/// marker the client's own delete leaves behind stays in the bucket. A crash between the two
/// leaves an entry whose chunks are gone, which no job refers to any more.
pub async fn delete(js: &jetstream::Context, names: &Names, name: &str) -> Result<(), String> {
    let bucket = bounded(js.get_object_store(&names.payloads))
        .await
        .map_err(|e| e.to_string())?;
    let info = match bounded(bucket.info(name)).await {
        Ok(info) => info,
        Err(e) if not_found(&e) => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let stream = js
        .get_stream_no_info(&names.payload_stream)
        .await
        .map_err(|e| e.to_string())?;
    for subject in [
        format!("$O.{}.C.{}", names.payloads, info.nuid),
        format!("$O.{}.M.{}", names.payloads, encode_name(name)),
    ] {
        stream
            .purge()
            .filter(subject)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Deletes a done job's object, best effort: a leftover object costs space, not correctness.
pub async fn forget(js: &jetstream::Context, names: &Names, object: &ObjectRef, job: &str) {
    if let Err(e) = delete(js, names, &object.name).await {
        tracing::debug!(
            job_id = job,
            "payload object {} not removed: {e}",
            object.shown(names)
        );
    }
}

async fn bounded<T, E: std::fmt::Display>(
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(1), f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within the request timeout".to_owned()),
    }
}

fn not_found(error: &str) -> bool {
    error.to_lowercase().contains("not found")
}

/// The object store's subject token for an object name: URL-safe base64 with padding, as the
/// client encodes it.
fn encode_name(name: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in name.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_as_the_object_store_does() {
        assert_eq!(encode_name(""), "");
        assert_eq!(encode_name("f"), "Zg==");
        assert_eq!(encode_name("fo"), "Zm8=");
        assert_eq!(encode_name("foo"), "Zm9v");
        assert_eq!(encode_name("01JABC~?"), "MDFKQUJDfj8=");
    }

    #[test]
    fn a_reference_survives_the_headers() {
        let object = ObjectRef {
            name: "01JABC".to_owned(),
            size: Some(5 << 20),
        };
        let mut headers = HeaderMap::new();
        assert_eq!(ObjectRef::of(Some(&headers)), None);
        object.add_to(&mut headers);
        assert_eq!(ObjectRef::of(Some(&headers)), Some(object));
    }
}
