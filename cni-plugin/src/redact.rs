//! Secrets never reach a log line. The service-account token travels in the kubeconfig the agent writes and in
//! every API request's `Authorization` header; a server (or a proxy in front of it) that echoes the request in an
//! error body, a library's error message, a `Debug` of a struct holding it would all put it in a log line, and from
//! there into the runtime's journal, the agent's pod log and `node-agent status`.
//!
//! - [`Secret`]: a token held by our code; its `Debug` and `Display` print `<redacted>`.
//! - [`register`]: a process-wide list of the secrets this process knows (the plugin registers its kubeconfig's
//!   token, the agent its service-account token each time it reads it), and [`scrub`], which replaces each of them,
//!   and its base64 forms, in a text with `<redacted>`.
//! - [`Redacted`]: a `tracing_subscriber` writer that scrubs every formatted log line before it is written, so no
//!   line of ours or of a library (kube, hyper, rustls at debug level) can carry a registered secret.

use std::borrow::Cow;
use std::fmt;
use std::io::{self, Write};
use std::sync::{RwLock, RwLockReadGuard};

use base64::Engine;
use tracing_subscriber::fmt::MakeWriter;

/// What a secret is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Shorter strings are not registered: they could be ordinary words, and a token is never that short.
pub const MIN_SECRET_LEN: usize = 8;

/// How many secrets are remembered (a rotating token registers a new one about every hour; the oldest go first).
pub const MAX_SECRETS: usize = 16;

/// A secret value: printed as `<redacted>`, by `Debug` and `Display` alike.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that must use it (the kubeconfig, the request).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Each registered secret with the forms it may take in a text, longest first (so a padded base64 form goes before
/// its unpadded prefix).
static SECRETS: RwLock<Vec<Vec<String>>> = RwLock::new(Vec::new());

fn secrets() -> RwLockReadGuard<'static, Vec<Vec<String>>> {
    // A panic while holding the lock leaves complete entries behind: still usable.
    SECRETS.read().unwrap_or_else(|e| e.into_inner())
}

/// The forms of `secret` to look for: itself and its base64 encodings (standard and URL-safe, with and without
/// padding).
fn forms(secret: &str) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let mut out = vec![secret.to_string()];
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        out.push(engine.encode(secret.as_bytes()));
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.len()));
    out.dedup();
    out
}

/// Remembers `secret` (trimmed, as a reader of a token file uses it) so that [`scrub`] removes it from every text
/// from now on. Too short a value is ignored (see [`MIN_SECRET_LEN`]); registering a known one again is cheap.
pub fn register(secret: &str) {
    let secret = secret.trim();
    if secret.len() < MIN_SECRET_LEN {
        return;
    }
    let known = |all: &[Vec<String>]| all.iter().any(|f| f.iter().any(|s| s == secret));
    if known(&secrets()) {
        return;
    }
    let mut all = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    if known(&all) {
        return;
    }
    if all.len() >= MAX_SECRETS {
        all.remove(0);
    }
    all.push(forms(secret));
}

/// `text` with every registered secret (and its base64 forms) replaced by `<redacted>`; borrowed when there was
/// none.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let all = secrets();
    let mut out = Cow::Borrowed(text);
    for form in all.iter().flatten() {
        if out.contains(form.as_str()) {
            out = Cow::Owned(out.replace(form.as_str(), REDACTED));
        }
    }
    out
}

/// A `MakeWriter` whose writers hold what is written (one formatted event) and write it scrubbed when dropped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Redacted<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Redacted<M> {
    type Writer = RedactingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter {
            inner: self.0.make_writer(),
            buf: Vec::new(),
        }
    }
}

/// See [`Redacted`].
pub struct RedactingWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write> RedactingWriter<W> {
    fn emit(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&self.buf);
        let clean = scrub(&text);
        let result = self.inner.write_all(clean.as_bytes());
        self.buf.clear();
        result.and_then(|()| self.inner.flush())
    }
}

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    /// Held back until the writer is dropped (a line is only scrubbed whole); `flush` has nothing to push yet.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for RedactingWriter<W> {
    fn drop(&mut self) {
        // Logging must never fail the caller; a lost line is all that can happen.
        let _ = self.emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_secret_prints_redacted() {
        let s = Secret::new("eyJhbGciOi.secret-value.sig");
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "eyJhbGciOi.secret-value.sig");
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Holder {
            token: Secret,
        }
        let dbg = format!("{:?}", Holder { token: s });
        assert!(!dbg.contains("secret-value"), "{dbg}");
    }

    #[test]
    fn registered_secrets_and_their_base64_are_scrubbed() {
        let token = "meshcni-unit-redact-token-0123456789";
        let b64 = base64::engine::general_purpose::STANDARD.encode(token);
        assert_eq!(scrub(&format!("a {token} b")), format!("a {token} b"));
        register(token);
        register("short");
        assert_eq!(
            scrub(&format!("Authorization: Bearer {token}; basic {b64}.")),
            "Authorization: Bearer <redacted>; basic <redacted>."
        );
        assert!(matches!(scrub("short and clean"), Cow::Borrowed(_)));
        register(&format!("  {token}\n"));
        assert_eq!(
            secrets()
                .iter()
                .filter(|f| f.iter().any(|s| s == token))
                .count(),
            1,
            "registered once"
        );
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, d: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(d);
            Ok(d.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_writer_scrubs_a_line_written_in_pieces() {
        let token = "meshcni-unit-writer-token-abcdefgh";
        register(token);
        let sink = Sink::default();
        let make = Redacted({
            let sink = sink.clone();
            move || sink.clone()
        });
        {
            let mut w = make.make_writer();
            let (a, b) = token.split_at(10);
            write!(w, "error: bearer {a}").unwrap();
            writeln!(w, "{b} rejected").unwrap();
            w.flush().unwrap();
            assert!(sink.0.lock().unwrap().is_empty(), "held until dropped");
        }
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out, "error: bearer <redacted> rejected\n");
    }
}
