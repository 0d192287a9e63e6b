//! Fuzz input as a flat little-endian record: [`Reader`] takes fields off
//! the front (zeros once the input runs out, so every input decodes), and
//! [`Writer`] lays out the same record for the seeds. A hand-made cursor
//! rather than `arbitrary`'s, because the seeds must be written in the
//! very layout the targets read, and `arbitrary` only reads.

/// Reads fields from the front of a fuzz input.
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { rest: data }
    }

    /// True once every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Up to `len` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (taken, rest) = self.rest.split_at(len.min(self.rest.len()));
        self.rest = rest;
        taken
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.rest.len())
    }

    /// `N` bytes, zero-padded at the end of the input.
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut field = [0u8; N];
        let taken = self.bytes(N);
        field[..taken.len()].copy_from_slice(taken);
        field
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A u16 length followed by that many bytes.
    pub fn sized(&mut self) -> &'a [u8] {
        let len = self.u16();
        self.bytes(usize::from(len))
    }
}

/// Lays out a record for [`Reader`].
#[derive(Default)]
pub struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(bytes);
        self
    }

    pub fn u8(&mut self, value: u8) -> &mut Self {
        self.bytes(&[value])
    }

    pub fn u16(&mut self, value: u16) -> &mut Self {
        self.bytes(&value.to_le_bytes())
    }

    pub fn u32(&mut self, value: u32) -> &mut Self {
        self.bytes(&value.to_le_bytes())
    }

    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.bytes(&value.to_le_bytes())
    }

    /// What [`Reader::sized`] reads: a u16 length, then the bytes.
    pub fn sized(&mut self, bytes: &[u8]) -> &mut Self {
        let len = u16::try_from(bytes.len()).expect("a seed field of at most 64 KiB");
        self.u16(len).bytes(bytes)
    }
}
