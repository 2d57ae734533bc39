//! What the fuzz targets share: the input formats that are not JSON (so that the committed seeds are readable and
//! built from Istio's golden inputs), and the renderer invariant "every token of a rendered rule is a fixed word of
//! the renderer or came from typed data".
//!
//! A failed invariant panics with the input and the offending value, which libFuzzer reports as a crash.

pub mod render;
pub mod text;

pub use render::{check_capture, Literals};
