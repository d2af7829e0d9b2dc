//! The S3 calls OpenDAL 0.59 does not offer, made directly: list and abort multipart
//! uploads, and replace an object's metadata in place.
//!
//! A daemon that crashes mid-write leaves its multipart uploads open, and their parts are
//! billed until someone aborts them; OpenDAL can neither list nor abort an upload it did not
//! start in this process (its S3 core is private). A streamed object's crc64 is known only
//! once its last byte is sent, after its metadata went out with the first request; a
//! CopyObject onto itself with `x-amz-metadata-directive: REPLACE` stores it, which
//! OpenDAL's copy cannot. Requests are signed with the same SigV4 code and credentials
//! OpenDAL uses, path-style against the same endpoint.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use http::header::HOST;
use http::Method;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqsign_aws_v4::{Credential, RequestSigner, StaticCredentialProvider};
use reqsign_core::{Context, Signer};
use serde::Deserialize;
use thiserror::Error;

use super::retry;
use super::source::{s3_credentials, Connection, Source, SourceError};

/// OpenDAL's default per-request timeout, used when the connection sets none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many pages (1000 uploads each on S3) per `list`: a server that keeps
/// answering "truncated" must not keep us looping.
const MAX_PAGES: usize = 1000;

/// SigV4's URI encoding: everything but unreserved characters (`A-Za-z0-9-._~`).
const AWS_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, Error)]
pub enum S3DirectError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("bucket `{bucket}`: endpoint `{endpoint}` is not a valid URL: {message}")]
    Endpoint {
        bucket: String,
        endpoint: String,
        message: String,
    },
    #[error("bucket `{bucket}`: building the HTTP client: {message}")]
    Client { bucket: String, message: String },
    #[error("bucket `{bucket}`: {what}: signing the request: {message}")]
    Sign {
        bucket: String,
        what: String,
        message: String,
    },
    #[error("bucket `{bucket}`: {what}: {message}")]
    Request {
        bucket: String,
        what: String,
        message: String,
    },
    #[error("bucket `{bucket}`: {what}: the server answered {status} {code}: {message}")]
    Status {
        bucket: String,
        what: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("bucket `{bucket}`: {what}: {message}")]
    Response {
        bucket: String,
        what: String,
        message: String,
    },
}

impl S3DirectError {
    /// As an OpenDAL error, for callers that handle the operator's errors: a missing
    /// object and a refusal keep their kinds.
    pub fn into_opendal(self) -> opendal::Error {
        let kind = match &self {
            S3DirectError::Status { status: 404, .. } => opendal::ErrorKind::NotFound,
            S3DirectError::Status { status: 403, .. } => opendal::ErrorKind::PermissionDenied,
            _ => opendal::ErrorKind::Unexpected,
        };
        opendal::Error::new(kind, self.to_string())
    }

    /// A conditional request whose condition did not hold (HTTP 412): the object is not
    /// the version the request named.
    pub fn is_precondition_failed(&self) -> bool {
        matches!(self, S3DirectError::Status { status: 412, .. })
    }
}

/// An in-progress multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    /// The object key, relative to the source prefix.
    pub key: String,
    pub upload_id: String,
    pub initiated: SystemTime,
}

/// Lists and aborts the multipart uploads of one S3 source.
pub struct S3Direct {
    client: reqwest::Client,
    /// Signs with static keys; `None` sends anonymous requests, as the operator does.
    signer: Option<Signer<Credential>>,
    /// Normalized endpoint, no trailing slash.
    endpoint: String,
    bucket: String,
    /// The source prefix with a trailing `/`, or empty.
    root: String,
    retries: usize,
}

impl S3Direct {
    /// The janitor for `source`, or `None` when it has no multipart uploads to clean:
    /// local directories and memory. OSS also gives `None` for now: it signs differently
    /// (not SigV4) and is not handled yet.
    pub fn for_source(
        source: &Source,
        connection: &Connection,
    ) -> Result<Option<S3Direct>, S3DirectError> {
        match source {
            Source::S3 { bucket, prefix } => Self::s3(bucket, prefix, connection).map(Some),
            Source::Oss { .. } | Source::Local(_) | Source::Memory => Ok(None),
        }
    }

    fn s3(bucket: &str, prefix: &str, connection: &Connection) -> Result<Self, S3DirectError> {
        let signer = s3_credentials(connection)?.map(|creds| {
            let mut provider =
                StaticCredentialProvider::new(&creds.access_key_id, &creds.secret_access_key);
            if let Some(token) = &creds.session_token {
                provider = provider.with_session_token(token);
            }
            Signer::new(
                Context::new(),
                provider,
                RequestSigner::new("s3", &connection.region),
            )
        });
        let prefix = prefix.trim_matches('/');
        Ok(S3Direct {
            client: http_client(bucket, connection)?,
            signer,
            endpoint: endpoint(bucket, connection)?,
            bucket: bucket.to_string(),
            root: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            retries: connection.retries,
        })
    }

    /// Every in-progress multipart upload whose key starts with `prefix` (relative to the
    /// source prefix), all pages, in the server's order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<PendingUpload>, S3DirectError> {
        let full_prefix = format!("{}{prefix}", self.root);
        let what = if full_prefix.is_empty() {
            "listing multipart uploads".to_string()
        } else {
            format!("listing multipart uploads under `{full_prefix}`")
        };
        let mut uploads = Vec::new();
        let mut marker: Option<(String, String)> = None;
        for _ in 0..MAX_PAGES {
            let page = self.list_page(&what, &full_prefix, marker.as_ref()).await?;
            for upload in page.uploads {
                if let Some(pending) = self.pending(&what, upload)? {
                    uploads.push(pending);
                }
            }
            if !page.is_truncated {
                return Ok(uploads);
            }
            let next = (page.next_key_marker, page.next_upload_id_marker);
            // Markers that do not move would make the next page this one again.
            if next.0.is_empty() || marker.as_ref() == Some(&next) {
                return Err(self.bad_response(&what, "truncated page without a new key marker"));
            }
            marker = Some(next);
        }
        Err(self.bad_response(&what, &format!("still truncated after {MAX_PAGES} pages")))
    }

    /// Aborts `upload`, deleting its parts. An upload that is already gone counts as
    /// aborted: that is also what a retry sees after a lost answer.
    pub async fn abort(&self, upload: &PendingUpload) -> Result<(), S3DirectError> {
        let key = format!("{}{}", self.root, upload.key);
        let what = format!(
            "aborting multipart upload `{}` of `{key}`",
            upload.upload_id
        );
        let url = format!(
            "{}/{}/{}?uploadId={}",
            self.endpoint,
            self.bucket,
            encode_path(&key),
            encode(&upload.upload_id)
        );
        let (status, _, body) = self.send(&what, Method::DELETE, &url, &[]).await?;
        if status.is_success() {
            return Ok(());
        }
        let err = self.status_error(&what, status, &body);
        match &err {
            S3DirectError::Status { code, .. } if code == "NoSuchUpload" => Ok(()),
            _ => Err(err),
        }
    }

    /// Replaces the user metadata of `key` (relative to the source prefix) with
    /// `metadata`, by copying the object onto itself; the bytes do not move through us.
    /// With `if_match`, only while the object is that version (S3 answers 412 otherwise:
    /// see [`S3DirectError::is_precondition_failed`]; a server that ignores the header
    /// copies regardless). Returns the object's new ETag. One CopyObject holds at most
    /// 5 GiB.
    ///
    /// A copy that replaces metadata sets every header anew: the object's content headers
    /// (`Content-Type`, ...) and the user metadata other tools wrote under names this
    /// mount does not use are read by a HEAD first and sent again, so a chmod through the
    /// mount changes only what it owns.
    pub async fn replace_metadata(
        &self,
        key: &str,
        metadata: &HashMap<String, String>,
        if_match: Option<&str>,
    ) -> Result<Option<String>, S3DirectError> {
        let what = format!("replacing the metadata of `{}{key}`", self.root);
        let replaced = Replaced {
            metadata,
            content_type: None,
        };
        self.copy_replacing(&what, key, key, &replaced, if_match)
            .await
    }

    /// Copies `from` to `to` (relative to the source prefix) with the `Content-Type`
    /// `content_type`, every other header and all user metadata as they are: a rename to
    /// a name of another type. Returns the copy's ETag. One CopyObject holds at most 5 GiB.
    pub async fn copy_retyped(
        &self,
        from: &str,
        to: &str,
        content_type: &str,
    ) -> Result<Option<String>, S3DirectError> {
        let what = format!("copying `{}{from}` to `{}{to}`", self.root, self.root);
        let replaced = Replaced {
            metadata: &HashMap::new(),
            content_type: Some(content_type),
        };
        self.copy_replacing(&what, from, to, &replaced, None).await
    }

    /// A CopyObject of `from` to `to` that replaces the headers `replaced` names and sends
    /// again the ones it keeps, read by a HEAD of `from` first.
    async fn copy_replacing(
        &self,
        what: &str,
        from: &str,
        to: &str,
        replaced: &Replaced<'_>,
        if_match: Option<&str>,
    ) -> Result<Option<String>, S3DirectError> {
        let kept = match self.head(from).await? {
            Some(headers) => headers_kept_on_replace(&headers, replaced),
            None => Vec::new(), // gone: the copy says so
        };
        let source = encode_path(&format!("{}{from}", self.root));
        let url = format!(
            "{}/{}/{}",
            self.endpoint,
            self.bucket,
            encode_path(&format!("{}{to}", self.root))
        );
        let mut headers = vec![
            (
                "x-amz-copy-source".to_string(),
                format!("/{}/{source}", self.bucket),
            ),
            (
                "x-amz-metadata-directive".to_string(),
                "REPLACE".to_string(),
            ),
        ];
        if let Some(etag) = if_match {
            headers.push(("x-amz-copy-source-if-match".to_string(), etag.to_string()));
        }
        headers.extend(kept);
        if let Some(content_type) = replaced.content_type {
            headers.push(("content-type".to_string(), content_type.to_string()));
        }
        headers.extend(
            replaced
                .metadata
                .iter()
                .map(|(name, value)| (format!("x-amz-meta-{name}"), value.clone())),
        );
        let (status, _, body) = self.send(what, Method::PUT, &url, &headers).await?;
        let text = String::from_utf8_lossy(&body);
        // CopyObject may answer 200 and still fail, with an <Error> body.
        if !status.is_success() || text.contains("<Error>") {
            return Err(self.status_error(what, status, &body));
        }
        let result: CopyResultXml = quick_xml::de::from_str(&text).unwrap_or_default();
        Ok(Some(result.etag).filter(|etag| !etag.is_empty()))
    }

    /// The user metadata of `key` by a HEAD; `None` when there is no such object. OpenDAL
    /// cannot do this for a directory marker (`dir/`): it answers a stat of such a key
    /// from a listing, without the marker's metadata.
    pub async fn user_metadata(
        &self,
        key: &str,
    ) -> Result<Option<HashMap<String, String>>, S3DirectError> {
        let Some(headers) = self.head(key).await? else {
            return Ok(None);
        };
        let metadata = headers
            .iter()
            .filter_map(|(name, value)| {
                let name = name.as_str().strip_prefix(META_PREFIX)?;
                Some((name.to_string(), value.to_str().ok()?.to_string()))
            })
            .collect();
        Ok(Some(metadata))
    }

    /// The response headers of a HEAD of `key`; `None` when there is no such object.
    async fn head(&self, key: &str) -> Result<Option<http::HeaderMap>, S3DirectError> {
        let full = format!("{}{key}", self.root);
        let what = format!("HEAD `{full}`");
        let url = format!("{}/{}/{}", self.endpoint, self.bucket, encode_path(&full));
        let (status, headers, body) = self.send(&what, Method::HEAD, &url, &[]).await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(self.status_error(&what, status, &body));
        }
        Ok(Some(headers))
    }

    async fn list_page(
        &self,
        what: &str,
        full_prefix: &str,
        marker: Option<&(String, String)>,
    ) -> Result<ListPage, S3DirectError> {
        // `uploads=` rather than `uploads`: the same bytes on the wire as in the signature.
        let mut url = format!(
            "{}/{}?uploads=&prefix={}",
            self.endpoint,
            self.bucket,
            encode(full_prefix)
        );
        if let Some((key, upload_id)) = marker {
            url.push_str(&format!(
                "&key-marker={}&upload-id-marker={}",
                encode(key),
                encode(upload_id)
            ));
        }
        let (status, _, body) = self.send(what, Method::GET, &url, &[]).await?;
        if !status.is_success() {
            return Err(self.status_error(what, status, &body));
        }
        let text = String::from_utf8_lossy(&body);
        quick_xml::de::from_str(&text).map_err(|err| {
            self.bad_response(what, &format!("unreadable ListMultipartUploads XML: {err}"))
        })
    }

    /// One listed upload with its key made relative; `None` for a key outside the source
    /// prefix, which this janitor must never touch.
    fn pending(
        &self,
        what: &str,
        upload: UploadXml,
    ) -> Result<Option<PendingUpload>, S3DirectError> {
        let Some(key) = upload.key.strip_prefix(&self.root) else {
            tracing::warn!(bucket = %self.bucket, key = %upload.key, "listed upload outside the prefix; skipped");
            return Ok(None);
        };
        let initiated: jiff::Timestamp = upload.initiated.parse().map_err(|err| {
            self.bad_response(
                what,
                &format!(
                    "upload of `{}`: Initiated `{}` is not a timestamp: {err}",
                    upload.key, upload.initiated
                ),
            )
        })?;
        Ok(Some(PendingUpload {
            key: key.to_string(),
            upload_id: upload.upload_id,
            initiated: initiated.into(),
        }))
    }

    /// Sends one signed request, retrying transport errors and 5xx answers up to
    /// `retries` times; returns the last status and body.
    async fn send(
        &self,
        what: &str,
        method: Method,
        url: &str,
        headers: &[(String, String)],
    ) -> Result<Answer, S3DirectError> {
        let mut attempt = 0;
        loop {
            let result = self.send_once(what, method.clone(), url, headers).await;
            let retryable = match &result {
                Ok((status, _, _)) => status.is_server_error(),
                Err(S3DirectError::Request { .. }) => true,
                Err(_) => false,
            };
            if !retryable || attempt >= self.retries {
                return result;
            }
            attempt += 1;
            tokio::time::sleep(retry::pause_before(attempt)).await;
        }
    }

    async fn send_once(
        &self,
        what: &str,
        method: Method,
        url: &str,
        headers: &[(String, String)],
    ) -> Result<Answer, S3DirectError> {
        let request_error = |message: String| S3DirectError::Request {
            bucket: self.bucket.clone(),
            what: what.to_string(),
            message,
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|err| request_error(format!("invalid request URL {url}: {err}")))?;
        let mut builder = http::Request::builder().method(method.clone()).uri(uri);
        for (name, value) in headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let (mut parts, ()) = builder
            .body(())
            .map_err(|err| request_error(format!("building the request: {err}")))?
            .into_parts();
        if let Some(signer) = &self.signer {
            // Signed anew on every attempt: the signature carries the time.
            signer
                .sign(&mut parts, None)
                .await
                .map_err(|err| S3DirectError::Sign {
                    bucket: self.bucket.clone(),
                    what: what.to_string(),
                    message: err.to_string(),
                })?;
            // reqwest sets Host from the URL itself (OpenDAL drops it too).
            parts.headers.remove(HOST);
        }
        let response = self
            .client
            .request(method, url)
            .headers(parts.headers)
            .send()
            .await
            .map_err(|err| request_error(error_chain(&err)))?;
        let status = response.status();
        let answer_headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|err| request_error(format!("reading the answer: {}", error_chain(&err))))?;
        Ok((status, answer_headers, body))
    }

    fn status_error(&self, what: &str, status: reqwest::StatusCode, body: &[u8]) -> S3DirectError {
        let text = String::from_utf8_lossy(body);
        let parsed: Option<ErrorXml> = quick_xml::de::from_str(&text).ok();
        let (code, message) = match parsed {
            Some(err) => (err.code, err.message),
            None => (String::new(), text.chars().take(200).collect()),
        };
        S3DirectError::Status {
            bucket: self.bucket.clone(),
            what: what.to_string(),
            status: status.as_u16(),
            code,
            message,
        }
    }

    fn bad_response(&self, what: &str, message: &str) -> S3DirectError {
        S3DirectError::Response {
            bucket: self.bucket.clone(),
            what: what.to_string(),
            message: message.to_string(),
        }
    }
}

/// The endpoint the operator talks to: the configured one (https when it has no scheme)
/// or the region's AWS endpoint, path-style (the bucket goes in the path).
/// Status, headers and body of one answer.
type Answer = (reqwest::StatusCode, http::HeaderMap, bytes::Bytes);

const META_PREFIX: &str = "x-amz-meta-";

/// The headers that describe an object's content rather than its place or version; a
/// copy that replaces metadata keeps them only if they are sent again.
const CONTENT_HEADERS: [&str; 6] = [
    "content-type",
    "content-encoding",
    "content-disposition",
    "content-language",
    "cache-control",
    "expires",
];

/// What a copy that replaces headers sets anew.
struct Replaced<'a> {
    /// User metadata entries (without the `x-amz-meta-` prefix).
    metadata: &'a HashMap<String, String>,
    content_type: Option<&'a str>,
}

/// Of an object's HEAD `headers`, those a copy that replaces headers must send again to
/// keep them: its content headers and user metadata, apart from those `replaced` sets.
fn headers_kept_on_replace(
    headers: &http::HeaderMap,
    replaced: &Replaced<'_>,
) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            match name.strip_prefix(META_PREFIX) {
                Some(user) => !replaced.metadata.contains_key(user),
                None if name == "content-type" => replaced.content_type.is_none(),
                None => CONTENT_HEADERS.contains(&name),
            }
        })
        .filter_map(|(name, value)| match value.to_str() {
            Ok(value) => Some((name.as_str().to_string(), value.to_string())),
            Err(_) => {
                // S3 hands non-ASCII metadata out encoded (RFC 2047): not expected here.
                tracing::warn!(header = name.as_str(), "not kept: the value is not text");
                None
            }
        })
        .collect()
}

fn endpoint(bucket: &str, connection: &Connection) -> Result<String, S3DirectError> {
    let configured = match &connection.endpoint {
        Some(endpoint) if endpoint.starts_with("http") => endpoint.clone(),
        Some(endpoint) => format!("https://{endpoint}"),
        None => format!("https://s3.{}.amazonaws.com", connection.region),
    };
    // Parsing normalizes it as OpenDAL does (default ports dropped).
    let url = reqwest::Url::parse(&configured).map_err(|err| S3DirectError::Endpoint {
        bucket: bucket.to_string(),
        endpoint: configured.clone(),
        message: err.to_string(),
    })?;
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// No proxy and no redirects: requests go to the configured endpoint and nowhere else.
fn http_client(bucket: &str, connection: &Connection) -> Result<reqwest::Client, S3DirectError> {
    reqwest::Client::builder()
        .timeout(connection.request_timeout.unwrap_or(DEFAULT_TIMEOUT))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|err| S3DirectError::Client {
            bucket: bucket.to_string(),
            message: error_chain(&err),
        })
}

fn encode(value: &str) -> String {
    utf8_percent_encode(value, AWS_ENCODE).to_string()
}

/// An error with its causes: reqwest's own message omits the useful part
/// ("connection refused", "timed out").
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(err) = cause {
        text.push_str(": ");
        text.push_str(&err.to_string());
        cause = err.source();
    }
    text
}

/// One page of ListMultipartUploads.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
struct ListPage {
    is_truncated: bool,
    next_key_marker: String,
    next_upload_id_marker: String,
    #[serde(rename = "Upload")]
    uploads: Vec<UploadXml>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UploadXml {
    key: String,
    upload_id: String,
    initiated: String,
}

/// The largest object one CopyObject copies (larger ones need a multipart copy).
pub const MAX_COPY_SIZE: u64 = 5 << 30;

/// CopyObject's answer.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
struct CopyResultXml {
    #[serde(rename = "ETag")]
    etag: String,
}

/// A key as a URL path, each segment SigV4-encoded.
fn encode_path(key: &str) -> String {
    key.split('/')
        .map(|segment| utf8_percent_encode(segment, AWS_ENCODE).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// S3's error body.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
struct ErrorXml {
    code: String,
    message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metadata_replacement_keeps_content_headers_and_other_tools_metadata() {
        let mut headers = http::HeaderMap::new();
        for (name, value) in [
            ("content-type", "text/csv"),
            ("cache-control", "max-age=60"),
            ("etag", "\"abc\""),
            ("content-length", "12"),
            ("last-modified", "Mon, 07 Dec 2026 10:00:00 GMT"),
            ("x-amz-meta-owner", "backup-tool"),
            ("x-amz-meta-mode", "33188"),
            ("x-amz-server-side-encryption", "AES256"),
        ] {
            headers.insert(
                http::HeaderName::from_static(name),
                http::HeaderValue::from_static(value),
            );
        }
        let kept = |replaced: &Replaced<'_>| {
            let mut kept = headers_kept_on_replace(&headers, replaced);
            kept.sort();
            kept
        };
        let named = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        let ours = HashMap::from([("mode".to_string(), "33152".to_string())]);
        let chmod = Replaced {
            metadata: &ours,
            content_type: None,
        };
        assert_eq!(
            kept(&chmod),
            named(&[
                ("cache-control", "max-age=60"),
                ("content-type", "text/csv"),
                ("x-amz-meta-owner", "backup-tool"),
            ])
        );
        // A rename to another type: the new type replaces the old, all metadata stays.
        let retyped = Replaced {
            metadata: &HashMap::new(),
            content_type: Some("text/html"),
        };
        assert_eq!(
            kept(&retyped),
            named(&[
                ("cache-control", "max-age=60"),
                ("x-amz-meta-mode", "33188"),
                ("x-amz-meta-owner", "backup-tool"),
            ])
        );
    }

    #[test]
    fn truncated_page_parses_with_markers() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>b</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
  <NextKeyMarker>p/b</NextKeyMarker><NextUploadIdMarker>id2</NextUploadIdMarker>
  <MaxUploads>2</MaxUploads><IsTruncated>true</IsTruncated>
  <Upload><Key>p/a</Key><UploadId>id1</UploadId><StorageClass>STANDARD</StorageClass>
    <Initiated>2024-05-01T12:00:00.000Z</Initiated></Upload>
  <Prefix>p/</Prefix>
  <Upload><Key>p/b</Key><UploadId>id2</UploadId><Initiated>2024-05-01T12:00:01Z</Initiated></Upload>
</ListMultipartUploadsResult>"#;
        let page: ListPage = quick_xml::de::from_str(xml).expect("parses");
        assert!(page.is_truncated);
        assert_eq!(
            (
                page.next_key_marker.as_str(),
                page.next_upload_id_marker.as_str()
            ),
            ("p/b", "id2")
        );
        let keys: Vec<&str> = page.uploads.iter().map(|u| u.key.as_str()).collect();
        assert_eq!(keys, ["p/a", "p/b"]);
    }

    #[test]
    fn empty_page_parses() {
        let xml = "<ListMultipartUploadsResult><IsTruncated>false</IsTruncated>\
                   <NextKeyMarker/></ListMultipartUploadsResult>";
        let page: ListPage = quick_xml::de::from_str(xml).expect("parses");
        assert!(!page.is_truncated && page.uploads.is_empty());
    }

    #[test]
    fn keys_encode_as_sigv4_wants() {
        assert_eq!(encode("a b+c/ü~.-_"), "a%20b%2Bc%2F%C3%BC~.-_");
    }
}
