//! Turning a descriptor chain into a checked block request.
//!
//! Nothing here trusts the guest: every descriptor must lie inside guest
//! memory and point the right way (device-readable or device-writable), the
//! chain may not be longer than the queue, data lengths must be whole sectors
//! and the sectors must lie inside the disk. The outcome is one of
//! - `Parsed::Request`: a valid request to execute, with its status address;
//! - `Parsed::Rejected`: a bad request the driver is told about through the
//!   status byte (IOERR or UNSUPP);
//! - `Parsed::Unanswerable`: not even a status byte to write; the chain is
//!   returned to the driver with nothing written.
//!
//! Framing: the 16-byte header starts the first descriptor (anything after it
//! in that descriptor is data) and the status is the last byte of the last
//! descriptor (anything before it in that descriptor is data), so both the
//! usual one-descriptor-per-part layout and merged layouts work.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::config::{DiskLimits, MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, SECTOR_SIZE};

/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector).
const HEADER_SIZE: u32 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes` (sector, num_sectors, flags).
const RANGE_SIZE: u64 = 16;

/// A piece of guest memory a request reads from or writes to; always checked
/// to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A run of sectors named by a DISCARD or WRITE_ZEROES request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorRange {
    pub sector: u64,
    pub count: u32,
    /// WRITE_ZEROES only: the driver allows deallocating the range.
    pub unmap: bool,
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// Read sectors from `sector` into the device-writable `buffers`.
    Read {
        sector: u64,
        buffers: Vec<Segment>,
    },
    /// Write the device-readable `buffers` to sectors from `sector`.
    Write {
        sector: u64,
        buffers: Vec<Segment>,
    },
    Flush,
    /// Copy the device serial into `buffers` (at most 20 bytes).
    GetId {
        buffers: Vec<Segment>,
    },
    Discard(Vec<SectorRange>),
    WriteZeroes(Vec<SectorRange>),
}

/// Why a request was refused, and the status that tells the driver so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
    #[error("the chain has no header descriptor before the status")]
    MissingHeader,
    #[error("the header descriptor is device-writable")]
    WritableHeader,
    #[error("the header descriptor is {0} bytes, less than 16")]
    ShortHeader(u32),
    #[error("descriptor at {addr:#x}+{len} lies outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("a data descriptor points the wrong way for this request")]
    WrongDirection,
    #[error("data length {0} is not a positive multiple of 512")]
    BadDataLength(u64),
    #[error("sectors {sector}+{count} lie beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("write to a readonly disk")]
    ReadOnly,
    #[error("{0} data segments, more than the advertised {1}")]
    TooManySegments(usize, u32),
    #[error("range list of {0} bytes is not a positive multiple of 16")]
    BadRangeList(u64),
    #[error("{0} ranges, more than the advertised {MAX_RANGE_SEGMENTS}")]
    TooManyRanges(u64),
    #[error("range of {0} sectors exceeds the advertised maximum")]
    RangeTooLong(u32),
    #[error("range flags {0:#x} are not supported for this request")]
    UnsupportedRangeFlags(u32),
}

impl Rejection {
    /// The virtio-blk status byte reported for this rejection.
    pub fn status(&self) -> u8 {
        match self {
            Rejection::UnsupportedType(_) | Rejection::UnsupportedRangeFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Why a chain cannot be answered at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("the chain has no descriptors")]
    Empty,
    #[error("the chain is longer than the queue ({0} descriptors)")]
    TooLong(usize),
    #[error("the last descriptor is not device-writable, so there is no status byte")]
    NoStatus,
    #[error("the status byte at {0:#x} lies outside guest memory")]
    StatusOutsideMemory(u64),
}

/// The result of looking at one descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Request {
        operation: Operation,
        status: GuestAddress,
    },
    Rejected {
        rejection: Rejection,
        status: GuestAddress,
    },
    Unanswerable(Malformed),
}

/// Parses and checks one chain. `descriptors` is the chain as the queue
/// yielded it (at most `max_chain_len + 1` are looked at).
pub fn parse<I>(
    descriptors: I,
    mem: &GuestMemoryMmap,
    limits: &DiskLimits,
    max_chain_len: usize,
) -> Parsed
where
    I: IntoIterator<Item = Descriptor>,
{
    let descs: Vec<Descriptor> = descriptors.into_iter().take(max_chain_len + 1).collect();
    let status = match find_status(&descs, mem, max_chain_len) {
        Ok(status) => status,
        Err(malformed) => return Parsed::Unanswerable(malformed),
    };
    match parse_answerable(&descs, mem, limits) {
        Ok(operation) => Parsed::Request { operation, status },
        Err(rejection) => Parsed::Rejected { rejection, status },
    }
}

fn find_status(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    max_chain_len: usize,
) -> Result<GuestAddress, Malformed> {
    if descs.len() > max_chain_len {
        return Err(Malformed::TooLong(descs.len()));
    }
    let last = descs.last().ok_or(Malformed::Empty)?;
    if !last.is_write_only() || last.len() == 0 {
        return Err(Malformed::NoStatus);
    }
    let status = last
        .addr()
        .0
        .checked_add(u64::from(last.len()) - 1)
        .map(GuestAddress)
        .ok_or(Malformed::StatusOutsideMemory(last.addr().0))?;
    if !mem.check_range(status, 1) {
        return Err(Malformed::StatusOutsideMemory(status.0));
    }
    Ok(status)
}

/// Parses a chain whose status byte is known to be usable.
fn parse_answerable(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    limits: &DiskLimits,
) -> Result<Operation, Rejection> {
    let (header, rest) = match descs {
        [header, rest @ ..] if !rest.is_empty() => (header, rest),
        _ => return Err(Rejection::MissingHeader),
    };
    if header.is_write_only() {
        return Err(Rejection::WritableHeader);
    }
    if header.len() < HEADER_SIZE {
        return Err(Rejection::ShortHeader(header.len()));
    }
    check_inside(mem, header.addr(), header.len())?;
    let mut raw = [0u8; HEADER_SIZE as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| Rejection::OutsideMemory {
            addr: header.addr().0,
            len: header.len(),
        })?;
    let request_type = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes([
        raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
    ]);

    let data = data_segments(header, rest, mem)?;
    match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let reading = request_type == VIRTIO_BLK_T_IN;
            if !reading && limits.readonly {
                return Err(Rejection::ReadOnly);
            }
            let buffers = directed(data, reading)?;
            if buffers.len() > limits.max_segments as usize {
                return Err(Rejection::TooManySegments(
                    buffers.len(),
                    limits.max_segments,
                ));
            }
            let len = total_len(&buffers);
            if len == 0 || len % SECTOR_SIZE != 0 {
                return Err(Rejection::BadDataLength(len));
            }
            check_sectors(limits, sector, len / SECTOR_SIZE)?;
            Ok(if reading {
                Operation::Read { sector, buffers }
            } else {
                Operation::Write { sector, buffers }
            })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Operation::Flush),
        VIRTIO_BLK_T_GET_ID => {
            let buffers = directed(data, true)?;
            if total_len(&buffers) == 0 {
                return Err(Rejection::BadDataLength(0));
            }
            Ok(Operation::GetId { buffers })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if limits.readonly {
                return Err(Rejection::ReadOnly);
            }
            let discard = request_type == VIRTIO_BLK_T_DISCARD;
            let ranges = read_ranges(&directed(data, false)?, mem, limits, discard)?;
            Ok(if discard {
                Operation::Discard(ranges)
            } else {
                Operation::WriteZeroes(ranges)
            })
        }
        other => Err(Rejection::UnsupportedType(other)),
    }
}

/// A data segment and whether the device may write it.
type DirectedSegment = (Segment, bool);

/// The data between header and status: the header descriptor's tail, the
/// middle descriptors, and the status descriptor's head, each checked to lie
/// inside guest memory. Empty pieces are dropped.
fn data_segments(
    header: &Descriptor,
    rest: &[Descriptor],
    mem: &GuestMemoryMmap,
) -> Result<Vec<DirectedSegment>, Rejection> {
    let (status_desc, middle) = match rest.split_last() {
        Some(split) => split,
        None => return Err(Rejection::MissingHeader),
    };
    let mut pieces = Vec::with_capacity(middle.len() + 2);
    pieces.push((
        header.addr().0.wrapping_add(u64::from(HEADER_SIZE)),
        header.len() - HEADER_SIZE,
        false,
    ));
    pieces.extend(
        middle
            .iter()
            .map(|d| (d.addr().0, d.len(), d.is_write_only())),
    );
    pieces.push((status_desc.addr().0, status_desc.len() - 1, true));

    let mut segments = Vec::with_capacity(pieces.len());
    for (addr, len, writable) in pieces.into_iter().filter(|&(_, len, _)| len > 0) {
        let addr = GuestAddress(addr);
        check_inside(mem, addr, len)?;
        segments.push((Segment { addr, len }, writable));
    }
    Ok(segments)
}

/// Keeps the segments if all point the way the request needs.
fn directed(data: Vec<DirectedSegment>, device_writes: bool) -> Result<Vec<Segment>, Rejection> {
    if data.iter().any(|&(_, writable)| writable != device_writes) {
        return Err(Rejection::WrongDirection);
    }
    Ok(data.into_iter().map(|(segment, _)| segment).collect())
}

fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

fn check_inside(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> Result<(), Rejection> {
    if mem.check_range(addr, len as usize) {
        Ok(())
    } else {
        Err(Rejection::OutsideMemory { addr: addr.0, len })
    }
}

fn check_sectors(limits: &DiskLimits, sector: u64, count: u64) -> Result<(), Rejection> {
    match sector.checked_add(count) {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err(Rejection::OutOfRange {
            sector,
            count,
            capacity: limits.capacity_sectors,
        }),
    }
}

/// Reads and checks the `virtio_blk_discard_write_zeroes` array.
fn read_ranges(
    buffers: &[Segment],
    mem: &GuestMemoryMmap,
    limits: &DiskLimits,
    discard: bool,
) -> Result<Vec<SectorRange>, Rejection> {
    let len = total_len(buffers);
    if len == 0 || len % RANGE_SIZE != 0 {
        return Err(Rejection::BadRangeList(len));
    }
    let count = len / RANGE_SIZE;
    if count > u64::from(MAX_RANGE_SEGMENTS) {
        return Err(Rejection::TooManyRanges(count));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    for segment in buffers {
        let start = bytes.len();
        bytes.resize(start + segment.len as usize, 0);
        mem.read_slice(&mut bytes[start..], segment.addr)
            .map_err(|_| Rejection::OutsideMemory {
                addr: segment.addr.0,
                len: segment.len,
            })?;
    }
    let allowed_flags = if discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    bytes
        .chunks_exact(RANGE_SIZE as usize)
        .map(|raw| {
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&raw[0..8]);
            let sector = u64::from_le_bytes(sector);
            let count = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
            if flags & !allowed_flags != 0 {
                return Err(Rejection::UnsupportedRangeFlags(flags));
            }
            if count > MAX_RANGE_SECTORS {
                return Err(Rejection::RangeTooLong(count));
            }
            check_sectors(limits, sector, u64::from(count))?;
            Ok(SectorRange {
                sector,
                count,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            })
        })
        .collect()
}
