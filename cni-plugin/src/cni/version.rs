//! CNI specification versions.

use std::fmt;

/// Versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 7] = [
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// A supported CNI version. Ordered by age.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_1_0,
    V0_2_0,
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

/// The three result formats the versions use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultFormat {
    /// 0.1.0 and 0.2.0: `ip4` / `ip6` objects.
    Legacy,
    /// 0.3.x and 0.4.0: `interfaces`, `ips` with `version`.
    V03,
    /// 1.x: `ips` without `version`.
    V1,
}

impl CniVersion {
    pub const ALL: [CniVersion; 7] = [
        CniVersion::V0_1_0,
        CniVersion::V0_2_0,
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        SUPPORTED_VERSIONS[self as usize]
    }

    pub fn result_format(self) -> ResultFormat {
        match self {
            CniVersion::V0_1_0 | CniVersion::V0_2_0 => ResultFormat::Legacy,
            CniVersion::V0_3_0 | CniVersion::V0_3_1 | CniVersion::V0_4_0 => ResultFormat::V03,
            CniVersion::V1_0_0 | CniVersion::V1_1_0 => ResultFormat::V1,
        }
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to VERSION.
pub fn supported_versions_json() -> serde_json::Value {
    serde_json::json!({
        "cniVersion": CniVersion::V1_1_0.as_str(),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}
