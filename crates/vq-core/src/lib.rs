//! vq-core
