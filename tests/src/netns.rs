//! Netns fixtures for tests (to be implemented).
