//! CONTRACT (being implemented by the netns helper): programming one pod netns.
use std::path::Path;

use crate::config::BackendChoice;
use crate::redirect::Redirect;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("placeholder")]
    Placeholder,
}

impl ApplyError {
    /// True when the netns itself is unusable (missing, not a netns, the host's).
    pub fn is_netns(&self) -> bool {
        false
    }
}

#[derive(Debug)]
pub struct Programmed {
    pub backend: &'static str,
}

pub fn program(
    _netns: &Path,
    _choice: BackendChoice,
    _redirect: &Redirect,
) -> Result<Programmed, ApplyError> {
    Err(ApplyError::Placeholder)
}
