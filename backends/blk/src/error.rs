/// Why pvstack-blk could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Image(#[from] pvstack_block::Error),
    #[error(transparent)]
    Serve(#[from] pvstack_backend_common::Error),
    #[error("--engine io-uring: io_uring is not available here: {0}; use --engine sync (or auto)")]
    IoUringUnavailable(String),
}
