//! Test fixtures shared by the end-to-end tests: an HTTPS API server stub, netns helpers, a CNI chain runner.

pub mod apiserver;
pub mod chain;
pub mod netns;
pub mod report;
pub mod traffic;
