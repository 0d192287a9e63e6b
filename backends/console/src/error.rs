use std::io;

/// Why pvstack-console stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Sandbox(#[from] pvstack_sandbox::Error),
    #[error("{what}: {cause}")]
    Io { what: String, cause: io::Error },
    #[error(transparent)]
    Serve(#[from] pvstack_backend_common::Error),
}
