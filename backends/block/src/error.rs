use std::io;
use std::path::PathBuf;

/// Why a disk image cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open image {path}: {cause}")]
    OpenImage { path: PathBuf, cause: io::Error },
    #[error("image {path} is not a regular file or block device")]
    NotAnImage { path: PathBuf },
    #[error("cannot read the size of image {path}: {cause}")]
    ImageSize { path: PathBuf, cause: io::Error },
    #[error("image {path} is {size} bytes, smaller than one 512-byte sector")]
    ImageTooSmall { path: PathBuf, size: u64 },
    #[error("the filesystem holding {path} does not support O_DIRECT; run without --direct")]
    DirectUnsupported { path: PathBuf },
}
