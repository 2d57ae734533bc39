//! Test fixtures shared by the end-to-end tests: an HTTPS API server stub, netns helpers, a CNI chain runner.

pub mod agent;
pub mod apiserver;
pub mod chain;
pub mod e2e;
pub mod gated;
pub mod netns;
pub mod nft;
pub mod preload;
pub mod rbac;
pub mod report;
pub mod tempdir;
pub mod traffic;
pub mod userns;
