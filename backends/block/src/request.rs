//! Turning a descriptor chain into a checked block request.
//!
//! Nothing here trusts the guest: every descriptor must lie inside guest
//! memory and point the right way (device-readable or device-writable), the
//! chain must end (its last descriptor says no other follows) and may not be
//! longer than [`max_chain_len`], data lengths must be whole sectors and the
//! sectors must lie inside the disk. The outcome is one of
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

impl Operation {
    /// The guest buffers of a read, a write or a GET_ID; none for the others.
    pub fn buffers(&self) -> &[Segment] {
        match self {
            Operation::Read { buffers, .. }
            | Operation::Write { buffers, .. }
            | Operation::GetId { buffers } => buffers,
            Operation::Flush | Operation::Discard(_) | Operation::WriteZeroes(_) => &[],
        }
    }
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
    #[error("data length {0} is not a positive multiple of 512 below 4 GiB")]
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
    #[error("the chain has {count} descriptors, more than the {limit} a request may have")]
    TooManyDescriptors { count: usize, limit: usize },
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
    /// The queue stopped yielding descriptors before one without NEXT: the
    /// chain loops, is longer than its table, leaves its table or guest
    /// memory, nests indirect tables, or holds more than 4 GiB.
    #[error("the chain breaks off after {0} descriptors (the last one says another follows)")]
    Broken(usize),
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

/// Descriptors one request may have on a queue of `queue_size` entries:
/// the queue size (the most a direct chain has), or header, seg_max data
/// segments and status when that is more. A driver with indirect
/// descriptors puts a whole request in one table whatever the queue size
/// (Linux does), and seg_max is sized before the driver sets the queue's
/// size (see `config::seg_max`).
pub fn max_chain_len(limits: &DiskLimits, queue_size: u16) -> usize {
    usize::from(queue_size).max(limits.max_segments as usize + 2)
}

/// Most descriptors a split queue yields for one chain: a direct part no
/// longer than the largest queue and one indirect table of at most
/// `u16::MAX` entries. Walking stops there even if an iterator goes on.
const MAX_WALK: usize = 32768 + u16::MAX as usize;

/// Parses and checks one chain. `descriptors` is the chain as the queue
/// yielded it, indirect table resolved; it is walked to its end (the queue
/// bounds that) so that a chain too long to serve still gets its status,
/// but only the first [`max_chain_len`] descriptors are kept.
pub fn parse<I>(
    descriptors: I,
    mem: &GuestMemoryMmap,
    limits: &DiskLimits,
    queue_size: u16,
) -> Parsed
where
    I: IntoIterator<Item = Descriptor>,
{
    let limit = max_chain_len(limits, queue_size);
    let mut descs = Vec::new();
    let mut count = 0;
    let mut last = None;
    for desc in descriptors.into_iter().take(MAX_WALK) {
        if count < limit {
            descs.push(desc);
        }
        count += 1;
        last = Some(desc);
    }
    let status = match find_status(last, count, mem) {
        Ok(status) => status,
        Err(malformed) => return Parsed::Unanswerable(malformed),
    };
    if count > limit {
        return Parsed::Rejected {
            rejection: Rejection::TooManyDescriptors { count, limit },
            status,
        };
    }
    match parse_answerable(&descs, mem, limits) {
        Ok(operation) => Parsed::Request { operation, status },
        Err(rejection) => Parsed::Rejected { rejection, status },
    }
}

/// The status byte: the last byte of the chain's last descriptor, which
/// must end the chain, be device-writable and lie inside guest memory.
fn find_status(
    last: Option<Descriptor>,
    count: usize,
    mem: &GuestMemoryMmap,
) -> Result<GuestAddress, Malformed> {
    let last = last.ok_or(Malformed::Empty)?;
    if last.has_next() {
        return Err(Malformed::Broken(count));
    }
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
            // The used length of a read must fit the used ring's u32.
            if len == 0 || len % SECTOR_SIZE != 0 || len > u64::from(u32::MAX) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_chains::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const MEM_SIZE: u64 = 0x10_0000;
    const QUEUE_SIZE: u16 = 16;
    const HEADER: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;

    fn limits(readonly: bool) -> DiskLimits {
        DiskLimits {
            capacity_sectors: 1024,
            readonly,
            max_segments: u32::from(QUEUE_SIZE) - 2,
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory")
    }

    /// Builds the chain in a real split queue of `queue_size` entries in
    /// guest memory, pops it the way the backend does, and parses it.
    fn parse_on_queue(
        mem: &GuestMemoryMmap,
        queue_size: u16,
        descs: &[RawDescriptor],
        limits: &DiskLimits,
    ) -> Parsed {
        let queue = MockSplitQueue::new(mem, queue_size);
        let chain = queue.build_desc_chain(descs).expect("build chain");
        parse(chain, mem, limits, queue_size)
    }

    /// As [`parse_on_queue`] on a queue of QUEUE_SIZE entries.
    fn parse_chain(mem: &GuestMemoryMmap, descs: &[RawDescriptor], limits: &DiskLimits) -> Parsed {
        parse_on_queue(mem, QUEUE_SIZE, descs, limits)
    }

    fn rejection(parsed: Parsed) -> Rejection {
        match parsed {
            Parsed::Rejected { rejection, status } => {
                assert_eq!(status, GuestAddress(STATUS));
                rejection
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn read_request_is_accepted() {
        let mem = memory();
        write_header(&mem, HEADER, VIRTIO_BLK_T_IN, 8);
        let parsed = parse_chain(
            &mem,
            &[
                readable(HEADER, 16),
                writable(DATA, 1024),
                writable(STATUS, 1),
            ],
            &limits(false),
        );
        assert_eq!(
            parsed,
            Parsed::Request {
                operation: Operation::Read {
                    sector: 8,
                    buffers: vec![Segment {
                        addr: GuestAddress(DATA),
                        len: 1024
                    }],
                },
                status: GuestAddress(STATUS),
            }
        );
    }

    #[test]
    fn merged_layout_splits_header_tail_and_status_head_into_data() {
        let mem = memory();
        write_header(&mem, HEADER, VIRTIO_BLK_T_OUT, 0);
        let parsed = parse_chain(
            &mem,
            &[readable(HEADER, 16 + 512), writable(STATUS, 1)],
            &limits(false),
        );
        assert_eq!(
            parsed,
            Parsed::Request {
                operation: Operation::Write {
                    sector: 0,
                    buffers: vec![Segment {
                        addr: GuestAddress(HEADER + 16),
                        len: 512
                    }],
                },
                status: GuestAddress(STATUS),
            }
        );
        write_header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);
        let parsed = parse_chain(
            &mem,
            &[readable(HEADER, 16), writable(DATA, 513)],
            &limits(false),
        );
        assert_eq!(
            parsed,
            Parsed::Request {
                operation: Operation::Read {
                    sector: 0,
                    buffers: vec![Segment {
                        addr: GuestAddress(DATA),
                        len: 512
                    }],
                },
                status: GuestAddress(DATA + 512),
            }
        );
    }

    #[test]
    fn write_to_readonly_disk_is_an_io_error() {
        let mem = memory();
        write_header(&mem, HEADER, VIRTIO_BLK_T_OUT, 0);
        let r = rejection(parse_chain(
            &mem,
            &[
                readable(HEADER, 16),
                readable(DATA, 512),
                writable(STATUS, 1),
            ],
            &limits(true),
        ));
        assert_eq!(r, Rejection::ReadOnly);
        assert_eq!(r.status(), VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn data_outside_guest_memory_is_an_io_error() {
        let mem = memory();
        write_header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);
        let r = rejection(parse_chain(
            &mem,
            &[
                readable(HEADER, 16),
                writable(MEM_SIZE - 256, 512),
                writable(STATUS, 1),
            ],
            &limits(false),
        ));
        assert_eq!(
            r,
            Rejection::OutsideMemory {
                addr: MEM_SIZE - 256,
                len: 512
            }
        );
        assert_eq!(r.status(), VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn partial_sectors_and_empty_data_are_io_errors() {
        let mem = memory();
        write_header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);
        let r = rejection(parse_chain(
            &mem,
            &[
                readable(HEADER, 16),
                writable(DATA, 500),
                writable(STATUS, 1),
            ],
            &limits(false),
        ));
        assert_eq!(r, Rejection::BadDataLength(500));
        let r = rejection(parse_chain(
            &mem,
            &[readable(HEADER, 16), writable(STATUS, 1)],
            &limits(false),
        ));
        assert_eq!(r, Rejection::BadDataLength(0));
    }

    #[test]
    fn sectors_past_the_end_are_io_errors_even_when_the_sum_overflows() {
        let mem = memory();
        for sector in [1023, u64::MAX] {
            write_header(&mem, HEADER, VIRTIO_BLK_T_IN, sector);
            let r = rejection(parse_chain(
                &mem,
                &[
                    readable(HEADER, 16),
                    writable(DATA, 1024),
                    writable(STATUS, 1),
                ],
                &limits(false),
            ));
            assert!(matches!(r, Rejection::OutOfRange { .. }), "{r:?}");
        }
    }

    #[test]
    fn wrong_direction_and_writable_header_are_io_errors() {
        let mem = memory();
        write_header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);
        let r = rejection(parse_chain(
            &mem,
            &[
                readable(HEADER, 16),
                readable(DATA, 512),
                writable(STATUS, 1),
            ],
            &limits(false),
        ));
        assert_eq!(r, Rejection::WrongDirection);
        let r = rejection(parse_chain(
            &mem,
            &[writable(HEADER, 16), writable(STATUS, 1)],
            &limits(false),
        ));
        assert_eq!(r, Rejection::WritableHeader);
        let r = rejection(parse_chain(
            &mem,
            &[readable(HEADER, 8), writable(STATUS, 1)],
            &limits(false),
        ));
        assert_eq!(r, Rejection::ShortHeader(8));
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let mem = memory();
        write_header(&mem, HEADER, 99, 0);
        let r = rejection(parse_chain(
            &mem,
            &[readable(HEADER, 16), writable(STATUS, 1)],
            &limits(false),
        ));
        assert_eq!(r, Rejection::UnsupportedType(99));
        assert_eq!(r.status(), VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn chain_without_usable_status_is_unanswerable() {
        let mem = memory();
        write_header(&mem, HEADER, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            parse_chain(
                &mem,
                &[readable(HEADER, 16), readable(DATA, 512)],
                &limits(false)
            ),
            Parsed::Unanswerable(Malformed::NoStatus)
        );
        assert_eq!(
            parse_chain(
                &mem,
                &[readable(HEADER, 16), writable(MEM_SIZE + 4096, 1)],
                &limits(false)
            ),
            Parsed::Unanswerable(Malformed::StatusOutsideMemory(MEM_SIZE + 4096))
        );
    }

    #[test]
    fn looping_chain_is_cut_at_the_queue_size() {
        let mem = memory();
        let queue = MockSplitQueue::new(&mem, QUEUE_SIZE);
        // Descriptor 0 is readable and points at itself forever.
        let looping = RawDescriptor::from(SplitDescriptor::new(HEADER, 16, NEXT, 0));
        let chain = queue
            .build_multiple_desc_chains(&[looping])
            .expect("build chain");
        assert_eq!(
            parse(chain, &mem, &limits(false), QUEUE_SIZE),
            Parsed::Unanswerable(Malformed::Broken(usize::from(QUEUE_SIZE)))
        );
    }

    const TABLE: u64 = 0x4_0000;

    /// A read of `segments` 512-byte data segments at DATA, DATA + 0x400, ...:
    /// header, data, status, as indirect table entries.
    fn read_entries(segments: usize) -> Vec<RawDescriptor> {
        let mut entries = vec![readable(HEADER, 16)];
        entries.extend((0..segments).map(|i| writable(DATA + 0x400 * i as u64, 512)));
        entries.push(writable(STATUS, 1));
        entries
    }

    #[test]
    fn an_indirect_table_of_seg_max_segments_is_served_on_a_smaller_queue() {
        let mem = memory();
        write_header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);
        let segments = limits(false).max_segments as usize;
        let head = indirect_table(&mem, TABLE, &read_entries(segments));
        // Linux puts a whole request in one table, even on a queue of 4.
        match parse_on_queue(&mem, 4, &[head], &limits(false)) {
            Parsed::Request {
                operation: Operation::Read { sector: 0, buffers },
                status,
            } => {
                assert_eq!(status, GuestAddress(STATUS));
                assert_eq!(buffers.len(), segments);
                assert_eq!(
                    buffers[segments - 1].addr,
                    GuestAddress(DATA + 0x400 * (segments as u64 - 1))
                );
            }
            other => panic!("expected a read, got {other:?}"),
        }
    }

    #[test]
    fn an_indirect_table_longer_than_a_request_may_be_is_an_io_error() {
        let mem = memory();
        write_header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);
        let limit = max_chain_len(&limits(false), 4);
        assert_eq!(limit, usize::from(QUEUE_SIZE));
        let segments = limits(false).max_segments as usize + 1;
        let head = indirect_table(&mem, TABLE, &read_entries(segments));
        let r = rejection(parse_on_queue(&mem, 4, &[head], &limits(false)));
        assert_eq!(
            r,
            Rejection::TooManyDescriptors {
                count: limit + 1,
                limit
            }
        );
        assert_eq!(r.status(), VIRTIO_BLK_S_IOERR as u8);
        // On a queue larger than header, seg_max and status, the chain fits
        // but its data segments do not.
        let r = rejection(parse_on_queue(&mem, 32, &[head], &limits(false)));
        assert_eq!(r, Rejection::TooManySegments(segments, segments as u32 - 1));
    }

    #[test]
    fn direct_descriptors_before_a_trailing_indirect_table_are_one_chain() {
        let mem = memory();
        write_header(&mem, HEADER, VIRTIO_BLK_T_IN, 2);
        let table = indirect_table(&mem, TABLE, &[writable(DATA, 1024), writable(STATUS, 1)]);
        assert_eq!(
            parse_chain(&mem, &[readable(HEADER, 16), table], &limits(false)),
            Parsed::Request {
                operation: Operation::Read {
                    sector: 2,
                    buffers: vec![Segment {
                        addr: GuestAddress(DATA),
                        len: 1024
                    }],
                },
                status: GuestAddress(STATUS),
            }
        );
    }

    #[test]
    fn broken_indirect_tables_are_unanswerable() {
        let mem = memory();
        write_header(&mem, HEADER, VIRTIO_BLK_T_IN, 0);
        let unanswerable = |descs: &[RawDescriptor]| match parse_chain(&mem, descs, &limits(false))
        {
            Parsed::Unanswerable(why) => why,
            other => panic!("expected no answer, got {other:?}"),
        };
        // A table inside a table.
        let inner = indirect_table(&mem, TABLE + 0x1000, &read_entries(1)[1..]);
        let nested = indirect_table(&mem, TABLE, &[readable(HEADER, 16), inner]);
        assert_eq!(unanswerable(&[nested]), Malformed::Broken(1));
        // A table outside guest memory, or running out of it.
        let outside = RawDescriptor::from(SplitDescriptor::new(MEM_SIZE, 48, INDIRECT, 0));
        assert_eq!(unanswerable(&[outside]), Malformed::Empty);
        let last_two = GuestAddress(MEM_SIZE - 32);
        mem.write_obj(SplitDescriptor::new(HEADER, 16, NEXT, 1), last_two)
            .expect("write entry");
        let data = SplitDescriptor::new(DATA, 512, WRITE | NEXT, 2);
        mem.write_obj(data, GuestAddress(MEM_SIZE - 16))
            .expect("write entry");
        let straddling = RawDescriptor::from(SplitDescriptor::new(last_two.0, 48, INDIRECT, 0));
        assert_eq!(unanswerable(&[straddling]), Malformed::Broken(2));
        // A table whose entries loop, or lead out of the table.
        let looping = indirect_table(&mem, TABLE, &read_entries(2));
        mem.write_obj(
            SplitDescriptor::new(DATA, 512, WRITE | NEXT, 0),
            GuestAddress(TABLE + 16),
        )
        .expect("write entry");
        assert_eq!(unanswerable(&[looping]), Malformed::Broken(4));
        mem.write_obj(
            SplitDescriptor::new(DATA, 512, WRITE | NEXT, 9),
            GuestAddress(TABLE + 16),
        )
        .expect("write entry");
        assert_eq!(unanswerable(&[looping]), Malformed::Broken(2));
        // A table whose length is not a whole number of descriptors.
        indirect_table(&mem, TABLE, &read_entries(1));
        let ragged = RawDescriptor::from(SplitDescriptor::new(TABLE, 40, INDIRECT, 0));
        assert_eq!(
            unanswerable(&[readable(HEADER, 16), ragged]),
            Malformed::Broken(1)
        );
    }

    fn write_ranges(mem: &GuestMemoryMmap, ranges: &[(u64, u32, u32)]) {
        for (i, (sector, count, flags)) in ranges.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&sector.to_le_bytes());
            raw[8..12].copy_from_slice(&count.to_le_bytes());
            raw[12..16].copy_from_slice(&flags.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(DATA + 16 * i as u64))
                .expect("write range");
        }
    }

    #[test]
    fn discard_and_write_zeroes_ranges_are_checked() {
        let mem = memory();
        let descs = [
            readable(HEADER, 16),
            readable(DATA, 32),
            writable(STATUS, 1),
        ];
        write_ranges(
            &mem,
            &[(0, 8, 0), (100, 4, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
        );
        write_header(&mem, HEADER, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert_eq!(
            parse_chain(&mem, &descs, &limits(false)),
            Parsed::Request {
                operation: Operation::WriteZeroes(vec![
                    SectorRange {
                        sector: 0,
                        count: 8,
                        unmap: false
                    },
                    SectorRange {
                        sector: 100,
                        count: 4,
                        unmap: true
                    },
                ]),
                status: GuestAddress(STATUS),
            }
        );
        // Discard must not carry the unmap flag.
        write_header(&mem, HEADER, VIRTIO_BLK_T_DISCARD, 0);
        let r = rejection(parse_chain(&mem, &descs, &limits(false)));
        assert_eq!(
            r,
            Rejection::UnsupportedRangeFlags(VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
        );
        assert_eq!(r.status(), VIRTIO_BLK_S_UNSUPP as u8);
        // A range past the end of the disk.
        write_ranges(&mem, &[(1020, 8, 0), (0, 1, 0)]);
        let r = rejection(parse_chain(&mem, &descs, &limits(false)));
        assert!(matches!(r, Rejection::OutOfRange { .. }), "{r:?}");
        assert_eq!(
            rejection(parse_chain(&mem, &descs, &limits(true))),
            Rejection::ReadOnly
        );
    }

    #[test]
    fn get_id_wants_device_writable_data() {
        let mem = memory();
        write_header(&mem, HEADER, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(
            parse_chain(
                &mem,
                &[
                    readable(HEADER, 16),
                    writable(DATA, 20),
                    writable(STATUS, 1)
                ],
                &limits(true)
            ),
            Parsed::Request {
                operation: Operation::GetId {
                    buffers: vec![Segment {
                        addr: GuestAddress(DATA),
                        len: 20
                    }],
                },
                status: GuestAddress(STATUS),
            }
        );
    }
}
