//! CONTRACT (to be implemented): Redirect from a pod's annotations and its istio-proxy container.
use crate::pod::PodInfo;

/// The typed, validated redirect of one pod (Istio's `Redirect`, but parsed, never raw strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {}

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("annotation {annotation} has an invalid value {value:?}: {reason}")]
    Annotation {
        annotation: &'static str,
        value: String,
        reason: String,
    },
}

impl Redirect {
    /// Derives the redirect from the pod, with Istio's defaults; fails on any invalid value.
    pub fn from_pod(_pi: &PodInfo) -> Result<Self, RedirectError> {
        Ok(Redirect {})
    }
}
