//! CONTRACT (to be implemented): entering a netns on a dedicated thread; refusing the host's netns.
