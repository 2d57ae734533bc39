//! The CNI protocol (to be implemented).
