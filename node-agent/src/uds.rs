//! Small HTTP/1 servers on the agent's owner-only Unix sockets (bound by [`crate::podsock::bind`]): the plugin's log
//! socket (`POST /log`) and the status socket (`GET /status`). A handler sees the method, the path and the whole
//! body (bounded), and answers at once.
//!
//! Half-closed connections are served: a plugin may write its request and go (it gives the agent a few ms), and
//! its lines are still processed.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;

use crate::podsock::SocketError;

/// A request's handler: method, path, body -> response.
pub type Handler = Arc<dyn Fn(&Method, &str, Bytes) -> Response<Full<Bytes>> + Send + Sync>;

/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one connection may last.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    with_type(status, "text/plain; charset=utf-8", body.into())
}

pub fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

async fn answer(
    req: Request<Incoming>,
    max_body: usize,
    handler: &Handler,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    match Limited::new(body, max_body).collect().await {
        Ok(collected) => handler(&parts.method, parts.uri.path(), collected.to_bytes()),
        Err(e) => {
            tracing::debug!(path = parts.uri.path(), error = %e, "unreadable request body");
            text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body unreadable or larger than {max_body} bytes: {e}\n"),
            )
        }
    }
}

/// Serves `listener` (at `path`) until an accept error.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    max_body: usize,
    handler: Handler,
) -> Result<(), SocketError> {
    loop {
        let stream = crate::podsock::accept(&listener, &path).await?;
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(answer(req, max_body, &handler).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .half_close(true)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                // Typically a client that did not wait for the answer.
                Ok(Err(e)) => tracing::debug!(error = %e, "unix socket connection error"),
                Err(_) => tracing::debug!("unix socket connection timed out"),
            }
        });
    }
}

/// Binds the owner-only socket at `path` now (creating the run dir; a failure stops the agent at start) and
/// returns the supervised task serving it, rebinding after a failure, and the identity of the socket file it bound
/// last (on shutdown only that file is removed: a newer agent may have bound the path since).
#[allow(clippy::type_complexity)]
pub fn task(
    name: &'static str,
    path: PathBuf,
    max_body: usize,
    handler: Handler,
) -> Result<
    (
        impl std::future::Future<Output = ()>,
        Arc<Mutex<crate::podsock::SocketId>>,
    ),
    SocketError,
> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| SocketError::Bind {
            path: path.clone(),
            source,
        })?;
    }
    let (listener, id) = crate::podsock::bind(&path)?;
    let first = Arc::new(Mutex::new(Some(listener)));
    let bound = Arc::new(Mutex::new(id));
    let last = bound.clone();
    let task = crate::agent::supervise(name, move || {
        let (path, handler, first, bound) =
            (path.clone(), handler.clone(), first.clone(), bound.clone());
        async move {
            let taken = first.lock().unwrap_or_else(|e| e.into_inner()).take();
            let listener = match taken {
                Some(l) => l,
                None => {
                    let (l, id) = crate::podsock::bind(&path)?;
                    *bound.lock().unwrap_or_else(|e| e.into_inner()) = id;
                    l
                }
            };
            tracing::info!(path = %path.display(), "serving {name}");
            serve(listener, path, max_body, handler).await
        }
    });
    Ok((task, last))
}
