//! SOURCE parsing and operator construction: local directory, `fs://`, `s3://`, `oss://`,
//! `memory://`. Credentials come from the environment or a private credentials file.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use opendal::layers::{RetryEvent, RetryInterceptor, TimeoutLayer};
use opendal::{services, Operator};
use serde::Deserialize;
use thiserror::Error;

use super::retry;
use super::s3_direct::S3Direct;
use super::{AttrDefaults, Backend};

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("source `{0}`: unsupported scheme; use a directory path, fs:///abs/path, s3://BUCKET[/PREFIX], oss://BUCKET[/PREFIX] or memory://")]
    Scheme(String),
    #[error("source `{0}`: the bucket name is missing")]
    NoBucket(String),
    #[error("source `{path}`: {message}")]
    LocalDir { path: String, message: String },
    #[error("credentials file {path}: {message}")]
    Credentials { path: PathBuf, message: String },
    #[error("source `{source_text}`: {message}")]
    Direct {
        source_text: String,
        message: String,
    },
    #[error("source `{source_text}`: {error}")]
    Build {
        source_text: String,
        error: opendal::Error,
    },
}

/// Where the bucket is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Local(PathBuf),
    Memory,
    S3 { bucket: String, prefix: String },
    Oss { bucket: String, prefix: String },
}

impl Source {
    pub fn parse(text: &str) -> Result<Source, SourceError> {
        if let Some(rest) = text.strip_prefix("fs://") {
            return Ok(Source::Local(PathBuf::from(rest)));
        }
        if text == "memory://" || text == "memory" {
            return Ok(Source::Memory);
        }
        let bucket_and_prefix = |rest: &str| -> Result<(String, String), SourceError> {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(SourceError::NoBucket(text.to_string()));
            }
            Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
        };
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = bucket_and_prefix(rest)?;
            return Ok(Source::S3 { bucket, prefix });
        }
        if let Some(rest) = text.strip_prefix("oss://") {
            let (bucket, prefix) = bucket_and_prefix(rest)?;
            return Ok(Source::Oss { bucket, prefix });
        }
        if text.contains("://") {
            return Err(SourceError::Scheme(text.to_string()));
        }
        Ok(Source::Local(PathBuf::from(text)))
    }
}

/// Access keys for S3/OSS.
#[derive(Clone, Default, Deserialize)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default)]
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    // A secret must never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// How to reach the bucket, besides the SOURCE itself.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    pub endpoint: Option<String>,
    pub region: String,
    pub credentials_file: Option<PathBuf>,
    /// Per-request timeout (0 = OpenDAL's default).
    pub request_timeout: Option<Duration>,
    pub retries: usize,
}

/// Reads a credentials file, refusing one that group or others can read.
pub fn read_credentials_file(path: &Path) -> Result<Credentials, SourceError> {
    let fail = |message: String| SourceError::Credentials {
        path: path.to_path_buf(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|err| fail(err.to_string()))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(fail(format!(
            "is readable by group or others (mode {:o}); run `chmod 600 {}`",
            mode & 0o777,
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|err| fail(err.to_string()))?;
    toml::from_str(&text).map_err(|err| {
        fail(format!(
            "expected TOML with access_key_id and secret_access_key: {}",
            err.message()
        ))
    })
}

fn env_credentials(id_var: &str, secret_var: &str) -> Option<Credentials> {
    let access_key_id = std::env::var(id_var).ok()?;
    let secret_access_key = std::env::var(secret_var).ok()?;
    Some(Credentials {
        access_key_id,
        secret_access_key,
        session_token: None,
    })
}

fn credentials(
    connection: &Connection,
    id_var: &str,
    secret_var: &str,
) -> Result<Option<Credentials>, SourceError> {
    match &connection.credentials_file {
        Some(path) => read_credentials_file(path).map(Some),
        None => Ok(env_credentials(id_var, secret_var)),
    }
}

/// S3 credentials: the credentials file or `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, with
/// the file's session token or else `AWS_SESSION_TOKEN`; `None` means anonymous. Shared
/// with the upload janitor, so both sign with the same keys.
pub(crate) fn s3_credentials(connection: &Connection) -> Result<Option<Credentials>, SourceError> {
    let creds = credentials(connection, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")?;
    Ok(creds.map(|mut creds| {
        if creds.session_token.is_none() {
            creds.session_token = std::env::var("AWS_SESSION_TOKEN").ok();
        }
        creds
    }))
}

/// Builds the backend for a SOURCE.
pub fn open(
    source_text: &str,
    connection: &Connection,
    defaults: AttrDefaults,
) -> Result<Backend, SourceError> {
    let source = Source::parse(source_text)?;
    // Installs the reqwest HTTP transport once per process (S3, OSS).
    opendal::install_default();
    let build = |error: opendal::Error| SourceError::Build {
        source_text: source_text.to_string(),
        error,
    };
    let (op, local_root) = match &source {
        Source::Local(path) => {
            let root = prepare_local_root(source_text, path)?;
            // Writes land in a temporary file renamed into place when complete, so a
            // crash never leaves a truncated object under a real name.
            let builder = services::Fs::default()
                .root(&root.to_string_lossy())
                .atomic_write_dir(&root.join(LOCAL_TMP_DIR).to_string_lossy());
            (Operator::new(builder).map_err(build)?, Some(root))
        }
        Source::Memory => (
            Operator::new(services::Memory::default()).map_err(build)?,
            None,
        ),
        Source::S3 { bucket, prefix } => {
            let mut builder = services::S3::default()
                .bucket(bucket)
                .root(&format!("/{prefix}"))
                .region(&connection.region)
                .disable_config_load()
                .disable_ec2_metadata();
            if let Some(endpoint) = &connection.endpoint {
                builder = builder.endpoint(endpoint);
            }
            if let Some(creds) = s3_credentials(connection)? {
                builder = builder
                    .access_key_id(&creds.access_key_id)
                    .secret_access_key(&creds.secret_access_key);
                if let Some(token) = &creds.session_token {
                    builder = builder.session_token(token);
                }
            } else {
                builder = builder.skip_signature();
            }
            (Operator::new(builder).map_err(build)?, None)
        }
        Source::Oss { bucket, prefix } => {
            let mut builder = services::Oss::default()
                .bucket(bucket)
                .root(&format!("/{prefix}"));
            let endpoint = connection
                .endpoint
                .clone()
                .unwrap_or_else(|| format!("https://oss-{}.aliyuncs.com", connection.region));
            builder = builder.endpoint(&endpoint);
            if let Some(creds) =
                credentials(connection, "OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET")?
            {
                builder = builder
                    .access_key_id(&creds.access_key_id)
                    .access_key_secret(&creds.secret_access_key);
            }
            (Operator::new(builder).map_err(build)?, None)
        }
    };
    let mut timeout = TimeoutLayer::new();
    if let Some(limit) = connection.request_timeout {
        timeout = timeout.with_timeout(limit);
    }
    let op = op
        .layer(timeout)
        .layer(retry::layer(connection.retries).with_notify(LogRetry));
    let direct = S3Direct::for_source(&source, connection).map_err(|err| SourceError::Direct {
        source_text: source_text.to_string(),
        message: err.to_string(),
    })?;
    Ok(Backend::new(
        op,
        local_root,
        defaults,
        direct,
        describe(&source),
    ))
}

/// Logs each retried request with the error's message. OpenDAL's own notice prints the
/// error's Debug form, which includes a backtrace when `RUST_BACKTRACE` is set: resolving
/// it loads the binary's debug info, 170 MiB of RSS kept for the rest of the run.
struct LogRetry;

impl RetryInterceptor for LogRetry {
    fn intercept(&self, event: RetryEvent<'_>) {
        tracing::warn!(
            op = %event.op,
            attempt = event.attempt,
            retry_in = ?event.retry_after,
            error = %event.err,
            "bucket request failed; retrying"
        );
    }
}

fn describe(source: &Source) -> String {
    match source {
        Source::Local(path) => format!("fs://{}", path.display()),
        Source::Memory => "memory://".to_string(),
        Source::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
        Source::Oss { bucket, prefix } => format!("oss://{bucket}/{prefix}"),
    }
}

/// Where the embedded directory bucket keeps writes in progress (under the reserved prefix).
pub const LOCAL_TMP_DIR: &str = ".bucketgate/tmp";

fn prepare_local_root(source_text: &str, path: &Path) -> Result<PathBuf, SourceError> {
    let fail = |message: String| SourceError::LocalDir {
        path: source_text.to_string(),
        message,
    };
    let root = std::path::absolute(path).map_err(|err| fail(err.to_string()))?;
    match std::fs::metadata(&root) {
        Ok(meta) if meta.is_dir() => Ok(root),
        Ok(_) => Err(fail("is not a directory".to_string())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(fail(
            "does not exist; create the directory first".to_string(),
        )),
        Err(err) => Err(fail(err.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            Source::parse("/srv/b").expect("dir"),
            Source::Local("/srv/b".into())
        );
        assert_eq!(
            Source::parse("fs:///srv/b").expect("fs"),
            Source::Local("/srv/b".into())
        );
        assert_eq!(
            Source::parse("s3://bkt/some/prefix/").expect("s3"),
            Source::S3 {
                bucket: "bkt".into(),
                prefix: "some/prefix".into()
            }
        );
        assert_eq!(
            Source::parse("oss://bkt").expect("oss"),
            Source::Oss {
                bucket: "bkt".into(),
                prefix: String::new()
            }
        );
        assert_eq!(Source::parse("memory://").expect("memory"), Source::Memory);
        assert!(matches!(
            Source::parse("gcs://x"),
            Err(SourceError::Scheme(_))
        ));
        assert!(matches!(
            Source::parse("s3://"),
            Err(SourceError::NoBucket(_))
        ));
    }

    #[test]
    fn world_readable_credentials_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("creds.toml");
        std::fs::write(
            &path,
            "access_key_id = \"a\"\nsecret_access_key = \"s3cr3t\"\n",
        )
        .expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = read_credentials_file(&path)
            .expect_err("0644 must be refused")
            .to_string();
        assert!(
            err.contains("chmod 600") && !err.contains("s3cr3t"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let creds = read_credentials_file(&path).expect("0600 is fine");
        assert_eq!(creds.access_key_id, "a");
    }
}
