//! Event blocks: the events a batch appends, stored as one value.
//!
//! Events are the store's largest and most numerous writes (four per tool
//! call with a lease), and redb's cost per insert grows with the value:
//! an event of several hundred bytes rebuilds a leaf page of a few events on
//! every insert and allocates a new page every few. So a batch's events go
//! into one **block**, keyed by the seq of its last event, and cost the
//! batch one insert.
//!
//! A block is `first seq (u64 BE)` followed by one entry per event, in seq
//! order with no gap: `hash (32) | task id (16, zero if none) | length (u32
//! BE) | canonical bytes`. Blocks hold consecutive seqs and never overlap,
//! so the block holding seq `s` is the first whose key is `>= s`.
//!
//! A block is stored **deflated** when that is smaller ([`pack`]): its
//! header's top bit set, then the plain length (u32 BE) and the entries
//! deflated (raw DEFLATE, fast level). Events repeat their keys, links and
//! ids, so a block shrinks to about a third, and a small block no longer
//! takes a run of pages it half fills. Each event's `"prev_hash":"..",
//! "seq":N` is left out before deflating when it is what the chain says it
//! must be (the previous entry's hash, the entry's seq; the header's next
//! bit set, then the first entry's previous hash, 32 bytes, and per entry
//! the offset it was cut at, u32 BE, after its length): 64 hex digits of
//! a hash do not deflate, and the stored hash they repeat is right there.
//! [`unpack`] puts them back, so the canonical bytes, and every hash over
//! them, are as they were; a changed stored hash still shows at its own
//! event, whose bytes no longer match it. A plain block (the top bit
//! clear, as every block before this format was) is read as it is;
//! readers see plain blocks only.
//!
//! A block is small (a batch's events, about 15 at full load), so deflate
//! has little history to find repeats in, and each block would pay again for
//! the keys every event repeats. So a block is deflated **primed** with
//! [`DICTIONARY`] (typical events' skeletons, the header's third bit set):
//! the compressor sees the dictionary first and the stored stream starts
//! after it, its matches free to reach back into it, as zlib's preset
//! dictionary does. The dictionary is part of the format: it may never
//! change (a test pins its SHA-256); blocks deflated without it (the bit
//! clear) still read.

use std::borrow::Cow;

use super::StoreError;

/// The header's top bit: the entries that follow are deflated.
const DEFLATED: u64 = 1 << 63;
/// The next bit: each entry's chain link was left out (see the module).
const UNLINKED: u64 = 1 << 62;
/// The third bit: deflated primed with [`DICTIONARY`].
const PRIMED: u64 = 1 << 61;

/// What a block is deflated after (see the module). Never to be changed:
/// stored blocks need exactly these bytes to inflate.
pub const DICTIONARY: &[u8] = include_bytes!("dictionary.txt");

/// `body` deflated (raw DEFLATE, fast level) as if it followed
/// [`DICTIONARY`]: the dictionary goes through the compressor first, is
/// flushed to a byte boundary and its output dropped. Each thread primes a
/// compressor once and starts every block from a copy of it: setting one
/// up costs more than deflating a block (measured: 61 µs of 84 for a block
/// of 15 events), and priming it again for each block cost 38 µs where
/// the copy costs 22 (a one-event block, throwaway release loop), for the
/// same bytes. `None` if compressing failed (the block is then stored
/// plain).
fn deflate_primed(body: &[u8]) -> Option<Vec<u8>> {
    use miniz_oxide::deflate::core::{
        CompressorOxide, TDEFLFlush, TDEFLStatus, compress_to_output,
        create_comp_flags_from_zip_params,
    };
    thread_local! {
        /// After the dictionary, and the one each block starts from.
        static COMPRESSORS: std::cell::RefCell<Option<(Box<CompressorOxide>, Box<CompressorOxide>)>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSORS.with_borrow_mut(|slot| {
        if slot.is_none() {
            let mut primed = Box::new(CompressorOxide::new(create_comp_flags_from_zip_params(
                1, -15, 0,
            )));
            let (status, _) =
                compress_to_output(&mut primed, DICTIONARY, TDEFLFlush::Sync, |_| true);
            if status != TDEFLStatus::Okay {
                return None;
            }
            let work = primed.clone();
            *slot = Some((primed, work));
        }
        let (primed, c) = slot.as_mut()?;
        c.clone_from(primed);
        let mut out = Vec::with_capacity(body.len() / 3 + 64);
        let (done, _) = compress_to_output(c, body, TDEFLFlush::Finish, |b| {
            out.extend_from_slice(b);
            true
        });
        // compressing into memory cannot fail; if it ever did, the block
        // is stored plain
        (done == TDEFLStatus::Done).then_some(out)
    })
}

/// The `len` bytes `deflated` inflates to after [`DICTIONARY`].
fn inflate_primed(deflated: &[u8], len: usize) -> Result<Vec<u8>, String> {
    use miniz_oxide::inflate::TINFLStatus;
    use miniz_oxide::inflate::core::{
        DecompressorOxide, decompress, inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    };
    let mut out = Vec::with_capacity(DICTIONARY.len() + len);
    out.extend_from_slice(DICTIONARY);
    out.resize(DICTIONARY.len() + len, 0);
    let mut d = DecompressorOxide::new();
    let (status, _, n) = decompress(
        &mut d,
        deflated,
        &mut out,
        DICTIONARY.len(),
        TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    match status {
        TINFLStatus::Done if n == len => {
            out.drain(..DICTIONARY.len());
            Ok(out)
        }
        TINFLStatus::Done | TINFLStatus::HasMoreOutput => {
            Err("inflates to another length than it records".into())
        }
        other => Err(format!("does not inflate: {other:?}")),
    }
}

/// `"prev_hash":"<hex>","seq":<seq>` as an event's canonical bytes hold it.
fn link(prev: &[u8; 32], seq: u64) -> Vec<u8> {
    let mut l = Vec::with_capacity(100);
    l.extend_from_slice(b"\"prev_hash\":\"");
    l.extend_from_slice(crate::hex::encode(prev).as_bytes());
    l.extend_from_slice(b"\",\"seq\":");
    l.extend_from_slice(seq.to_string().as_bytes());
    l
}

/// The block's entries with each chain link cut out, and the first
/// entry's previous hash; `None` if an entry's link is not where and what
/// the chain says (the block is then deflated as it is).
fn unlinked(first: u64, entries: &[u8]) -> Option<([u8; 32], Vec<u8>)> {
    const MARK: &[u8] = b"\"prev_hash\":\"";
    let mut out = Vec::with_capacity(entries.len());
    let (mut rest, mut seq) = (entries, first);
    let mut prev: Option<[u8; 32]> = None;
    let mut first_prev = [0u8; 32];
    while !rest.is_empty() {
        let (head, tail) = rest.split_first_chunk::<ENTRY_HEAD>()?;
        let len = u32::from_be_bytes([head[48], head[49], head[50], head[51]]) as usize;
        let bytes = tail.get(..len)?;
        // the top-level link is the last one: only `time` and `v` follow
        let at = bytes.windows(MARK.len()).rposition(|w| w == MARK)?;
        let p = match prev {
            Some(p) => p,
            None => {
                let hex =
                    std::str::from_utf8(bytes.get(at + MARK.len()..at + MARK.len() + 64)?).ok()?;
                first_prev = crate::hex::decode32(hex)?;
                first_prev
            }
        };
        let l = link(&p, seq);
        if bytes.get(at..at + l.len())? != l.as_slice()
            || !matches!(bytes.get(at + l.len()), Some(b',' | b'}'))
        {
            return None;
        }
        out.extend_from_slice(&head[..48]);
        out.extend_from_slice(&((len - l.len()) as u32).to_be_bytes());
        out.extend_from_slice(&(at as u32).to_be_bytes());
        out.extend_from_slice(&bytes[..at]);
        out.extend_from_slice(&bytes[at + l.len()..]);
        prev = Some(head[..32].try_into().ok()?);
        rest = &tail[len..];
        seq += 1;
    }
    Some((first_prev, out))
}

/// A block as it is stored: deflated when that is smaller, its chain links
/// left out when they are what the chain says.
pub fn pack(block: Vec<u8>) -> Vec<u8> {
    let Some((head, entries)) = block.split_first_chunk::<HEADER>() else {
        return block;
    };
    let first = u64::from_be_bytes(*head);
    let (flags, prefix, body) = match unlinked(first, entries) {
        Some((prev, body)) => (DEFLATED | UNLINKED | PRIMED, prev.to_vec(), body),
        None => (DEFLATED | PRIMED, Vec::new(), entries.to_vec()),
    };
    let Some(deflated) =
        deflate_primed(&body).filter(|d| prefix.len() + d.len() + 4 < entries.len())
    else {
        return block;
    };
    let mut out = Vec::with_capacity(HEADER + 4 + prefix.len() + deflated.len());
    out.extend_from_slice(&(first | flags).to_be_bytes());
    // a block is at most BLOCK_BYTES, far below 4 GiB
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&prefix);
    out.extend_from_slice(&deflated);
    out
}

/// A deflated block's entries as stored (inflated, their links still left
/// out when `UNLINKED`): (first seq, header flags, the first entry's
/// previous hash if unlinked, entries); `None` for a plain block.
type Inflated = (u64, u64, Option<[u8; 32]>, Vec<u8>);

fn inflated(stored: &[u8]) -> Result<Option<Inflated>, StoreError> {
    let Some((head, rest)) = stored.split_first_chunk::<HEADER>() else {
        return Ok(None);
    };
    let header = u64::from_be_bytes(*head);
    if header & DEFLATED == 0 {
        return Ok(None);
    }
    let first = header & !(DEFLATED | UNLINKED | PRIMED);
    let (len, rest) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| corrupt("is cut short"))?;
    let len = u32::from_be_bytes(*len) as usize;
    if len > BLOCK_BYTES * 2 {
        return Err(corrupt("claims more than a block holds"));
    }
    let (first_prev, deflated) = if header & UNLINKED != 0 {
        let (p, d) = rest
            .split_first_chunk::<32>()
            .ok_or_else(|| corrupt("is cut short"))?;
        (Some(*p), d)
    } else {
        (None, rest)
    };
    let entries = if header & PRIMED != 0 {
        inflate_primed(deflated, len).map_err(|e| corrupt(&e))?
    } else {
        let entries = miniz_oxide::inflate::decompress_to_vec_with_limit(deflated, len)
            .map_err(|e| corrupt(&format!("does not inflate: {e:?}")))?;
        if entries.len() != len {
            return Err(corrupt("inflates to another length than it records"));
        }
        entries
    };
    Ok(Some((first, header, first_prev, entries)))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("a deflated event block {what}"))
}

/// What pruning through `through` takes from the block stored under `key`:
/// how many of its events, and each task's first (task, seq) among them
/// (its entry in the task index). Reads only the entries' heads, without
/// putting chain links back.
pub fn pruned(
    key: u64,
    stored: &[u8],
    through: u64,
) -> Result<(u64, Vec<(u128, u64)>), StoreError> {
    let mut firsts: Vec<(u128, u64)> = Vec::new();
    let mut count = 0;
    let mut take = |seq: u64, task: u128| {
        count += 1;
        if task != 0 && !firsts.iter().any(|(t, _)| *t == task) {
            firsts.push((task, seq));
        }
    };
    let Some((first, header, _, body)) = inflated(stored)? else {
        for e in entries(key, stored) {
            let e = e?;
            if e.seq > through {
                break;
            }
            take(e.seq, e.task);
        }
        return Ok((count, firsts));
    };
    let head_len = ENTRY_HEAD + if header & UNLINKED != 0 { 4 } else { 0 };
    let (mut rest, mut seq) = (body.as_slice(), first);
    while !rest.is_empty() && seq <= through {
        let (head, tail) = (rest.get(..head_len), rest.get(head_len..));
        let (Some(head), Some(tail)) = (head, tail) else {
            return Err(corrupt("has an entry cut short"));
        };
        let n = u32::from_be_bytes([head[48], head[49], head[50], head[51]]) as usize;
        let task = u128::from_be_bytes(
            head[32..48]
                .try_into()
                .map_err(|_| corrupt("is cut short"))?,
        );
        rest = tail
            .get(n..)
            .ok_or_else(|| corrupt("has an event cut short"))?;
        take(seq, task);
        seq += 1;
    }
    if seq.saturating_sub(1) > key {
        return Err(corrupt("runs past its key"));
    }
    Ok((count, firsts))
}

/// The plain block a stored value holds: borrowed when stored plain.
pub fn unpack(stored: &[u8]) -> Result<Cow<'_, [u8]>, StoreError> {
    let Some((first, _, first_prev, entries)) = inflated(stored)? else {
        return Ok(Cow::Borrowed(stored));
    };
    let len = entries.len();
    let mut out = Vec::with_capacity(HEADER + len + len / 4);
    out.extend_from_slice(&first.to_be_bytes());
    let Some(mut prev) = first_prev else {
        out.extend_from_slice(&entries);
        return Ok(Cow::Owned(out));
    };
    let (mut rest, mut seq) = (entries.as_slice(), first);
    while !rest.is_empty() {
        let (head, tail) = rest
            .split_first_chunk::<{ ENTRY_HEAD + 4 }>()
            .ok_or_else(|| corrupt("has an entry cut short"))?;
        let n = u32::from_be_bytes([head[48], head[49], head[50], head[51]]) as usize;
        let at = u32::from_be_bytes([head[52], head[53], head[54], head[55]]) as usize;
        let bytes = tail
            .get(..n)
            .ok_or_else(|| corrupt("has an event cut short"))?;
        if at > n {
            return Err(corrupt("cuts an event past its end"));
        }
        let l = link(&prev, seq);
        out.extend_from_slice(&head[..48]);
        out.extend_from_slice(&((n + l.len()) as u32).to_be_bytes());
        out.extend_from_slice(&bytes[..at]);
        out.extend_from_slice(&l);
        out.extend_from_slice(&bytes[at..]);
        prev.copy_from_slice(&head[..32]);
        rest = &tail[n..];
        seq += 1;
    }
    Ok(Cow::Owned(out))
}

/// A block is closed before an event would take it past this many bytes
/// (a read of one event decodes at most one block). redb gives a large
/// value a power-of-two run of pages, its leaf's header included, so a
/// block one byte over 64 KiB would take 128 KiB: this leaves room for the
/// header.
pub const BLOCK_BYTES: usize = 64 * 1024 - 256;

const HEADER: usize = 8;
const ENTRY_HEAD: usize = 32 + 16 + 4;

/// One event of a block, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub seq: u64,
    pub hash: [u8; 32],
    /// Zero when the event belongs to no task.
    pub task: u128,
    pub bytes: &'a [u8],
}

/// A block being filled by a transaction.
#[derive(Debug, Default)]
pub struct BlockBuf {
    bytes: Vec<u8>,
    last: u64,
    /// The tasks with an event in the block so far.
    tasks: Vec<u128>,
}

impl BlockBuf {
    /// Whether an event of up to `event_bytes` would take this block past
    /// [`BLOCK_BYTES`] (an empty block takes any event).
    pub fn would_outgrow(&self, event_bytes: usize) -> bool {
        !self.bytes.is_empty() && self.bytes.len() + ENTRY_HEAD + event_bytes > BLOCK_BYTES
    }

    /// Append the event at `seq` (the seq after the last one appended):
    /// `write` appends its canonical bytes to the buffer and returns their
    /// hash. True if it is the block's first event of its task (a task's
    /// entry in the task index points there).
    pub fn push(
        &mut self,
        seq: u64,
        task: u128,
        write: impl FnOnce(&mut Vec<u8>) -> [u8; 32],
    ) -> bool {
        debug_assert!(self.bytes.is_empty() || seq == self.last + 1);
        if self.bytes.is_empty() {
            self.bytes.reserve(BLOCK_BYTES / 8);
            self.bytes.extend_from_slice(&seq.to_be_bytes());
        }
        let at = self.bytes.len();
        self.bytes.resize(at + ENTRY_HEAD, 0);
        self.bytes[at + 32..at + 48].copy_from_slice(&task.to_be_bytes());
        let hash = write(&mut self.bytes);
        let len = self.bytes.len() - at - ENTRY_HEAD;
        self.bytes[at..at + 32].copy_from_slice(&hash);
        // an event is far below 4 GiB (a request body is capped in KiB)
        self.bytes[at + 48..at + ENTRY_HEAD].copy_from_slice(&(len as u32).to_be_bytes());
        self.last = seq;
        let first = task != 0 && !self.tasks.contains(&task);
        if first {
            self.tasks.push(task);
        }
        first
    }

    /// The block so far and the seq of its last event (its key), leaving
    /// the buffer empty; `None` if nothing was appended.
    pub fn take(&mut self) -> Option<(u64, Vec<u8>)> {
        self.tasks.clear();
        (!self.bytes.is_empty()).then(|| (self.last, std::mem::take(&mut self.bytes)))
    }
}

/// The events of the block stored under `key`, in order. Each item fails
/// if the block is malformed or does not end at `key`.
pub fn entries(key: u64, block: &[u8]) -> Entries<'_> {
    let (first, rest) = match block.split_first_chunk::<HEADER>() {
        Some((h, rest)) => (Some(u64::from_be_bytes(*h)), rest),
        None => (None, &[][..]),
    };
    Entries {
        key,
        next: first,
        rest,
        failed: false,
    }
}

/// Iterator over a block's events (see [`entries`]).
#[derive(Debug)]
pub struct Entries<'a> {
    key: u64,
    /// The seq of the next entry; `None` for a block without a header.
    next: Option<u64>,
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Entries<'a> {
    fn corrupt(&mut self, what: &str) -> Option<Result<Entry<'a>, StoreError>> {
        self.failed = true;
        Some(Err(StoreError::Corrupt(format!(
            "event block {}: {what}",
            self.key
        ))))
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let Some(seq) = self.next else {
            return self.corrupt("too short for its header");
        };
        if self.rest.is_empty() {
            if seq != self.key.wrapping_add(1) {
                return self.corrupt("its events do not end at its key");
            }
            return None;
        }
        if seq > self.key {
            return self.corrupt("it holds events after its key");
        }
        let Some((head, rest)) = self.rest.split_first_chunk::<ENTRY_HEAD>() else {
            return self.corrupt("an entry is cut short");
        };
        let len = u32::from_be_bytes([head[48], head[49], head[50], head[51]]) as usize;
        if rest.len() < len {
            return self.corrupt("an event is cut short");
        }
        let (bytes, rest) = rest.split_at(len);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&head[..32]);
        let mut task = [0u8; 16];
        task.copy_from_slice(&head[32..48]);
        self.rest = rest;
        self.next = Some(seq + 1);
        Some(Ok(Entry {
            seq,
            hash,
            task: u128::from_be_bytes(task),
            bytes,
        }))
    }
}

/// The event at `seq` in the block stored under `key`.
pub fn find(key: u64, block: &[u8], seq: u64) -> Result<Option<Entry<'_>>, StoreError> {
    for e in entries(key, block) {
        let e = e?;
        if e.seq == seq {
            return Ok(Some(e));
        }
        if e.seq > seq {
            break;
        }
    }
    Ok(None)
}

/// What remains of a block after `seq` (a prune that ends inside it).
#[derive(Debug)]
pub struct Rest {
    pub block: Vec<u8>,
    /// Each task's first event in it: its entries in the task index.
    pub firsts: Vec<(u128, u64)>,
}

/// The part of a block after `seq`, or `None` if nothing of it remains.
pub fn after(key: u64, block: &[u8], seq: u64) -> Result<Option<Rest>, StoreError> {
    let mut out = BlockBuf::default();
    let mut firsts = Vec::new();
    for e in entries(key, block) {
        let e = e?;
        if e.seq > seq {
            let first = out.push(e.seq, e.task, |b| {
                b.extend_from_slice(e.bytes);
                e.hash
            });
            if first {
                firsts.push((e.task, e.seq));
            }
        }
    }
    Ok(out.take().map(|(_, block)| Rest { block, firsts }))
}

#[cfg(test)]
#[path = "blocks/tests.rs"]
mod tests;
