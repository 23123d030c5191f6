//! The event block format's tests: packing, links, the dictionary, what
//! a prune reads.

use super::*;

fn block(first: u64, events: &[(&str, u128)]) -> (u64, Vec<u8>) {
    let mut b = BlockBuf::default();
    for (i, (text, task)) in events.iter().enumerate() {
        b.push(first + i as u64, *task, |out| {
            out.extend_from_slice(text.as_bytes());
            [i as u8 + 1; 32]
        });
    }
    b.take().unwrap()
}

#[test]
fn push_says_which_event_is_its_tasks_first_in_the_block() {
    let mut b = BlockBuf::default();
    let mut push = |seq, task| b.push(seq, task, |_| [0; 32]);
    assert_eq!(
        [push(1, 5), push(2, 0), push(3, 5), push(4, 6), push(5, 0)],
        [true, false, false, true, false]
    );
    b.take();
    // a new block starts over
    assert!(b.push(6, 5, |_| [0; 32]));
}

#[test]
fn a_block_gives_back_its_events_in_order() {
    let (key, b) = block(7, &[("a", 1), ("bb", 0), ("", 9)]);
    assert_eq!(key, 9);
    let all: Vec<Entry<'_>> = entries(key, &b).collect::<Result<_, _>>().unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(
        all[0],
        Entry {
            seq: 7,
            hash: [1; 32],
            task: 1,
            bytes: b"a"
        }
    );
    assert_eq!((all[1].seq, all[1].task, all[1].bytes), (8, 0, &b"bb"[..]));
    assert_eq!(
        (all[2].seq, all[2].hash, all[2].bytes),
        (9, [3; 32], &b""[..])
    );
    assert_eq!(find(key, &b, 8).unwrap().unwrap().bytes, b"bb");
    assert_eq!(find(key, &b, 6).unwrap(), None);
    assert_eq!(find(key, &b, 10).unwrap(), None);
}

#[test]
fn a_packed_block_unpacks_to_itself_and_a_damaged_one_is_refused() {
    let text = r#"{"data":{"state":"active"},"kind":"lease.issued","links":{"task":"task_01"}}"#;
    let (key, plain) = block(5, &[(text, 1), (text, 1), (text, 2), (text, 0)]);
    let packed = pack(plain.clone());
    assert!(
        packed.len() < plain.len() / 2,
        "{} -> {}",
        plain.len(),
        packed.len()
    );
    assert!(matches!(unpack(&packed).unwrap(), Cow::Owned(_)));
    assert_eq!(unpack(&packed).unwrap().as_ref(), plain.as_slice());
    let seqs: Vec<u64> = entries(key, &unpack(&packed).unwrap())
        .map(|e| e.unwrap().seq)
        .collect();
    assert_eq!(seqs, [5, 6, 7, 8]);
    // a plain block, and one that deflating would not shrink, stay as
    // they are
    assert!(matches!(unpack(&plain).unwrap(), Cow::Borrowed(_)));
    let mut x = 0x2545_f491_u32;
    let noise: String = (0..96)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            char::from(b'!' + (x % 90) as u8)
        })
        .collect();
    let mut dense = 1u64.to_be_bytes().to_vec();
    dense.extend_from_slice(noise.as_bytes());
    assert_eq!(pack(dense.clone()), dense);
    // damage is an error or other bytes (which their hashes give
    // away: verification recomputes them), never a panic; a block cut
    // short or claiming too much is refused
    for at in [8, 11, 12, packed.len() / 2, packed.len() - 1] {
        let mut bad = packed.clone();
        bad[at] ^= 0x5a;
        if let Ok(b) = unpack(&bad) {
            let _ = entries(key, &b).count();
        }
    }
    assert!(unpack(&packed[..packed.len() - 3]).is_err());
    let mut huge = packed.clone();
    huge[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(unpack(&huge).is_err());
}

fn sha(bytes: &[u8]) -> [u8; 32] {
    let mut h = [0u8; 32];
    h.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    h
}

/// A block of `n` events from `first` chained as the writer chains
/// them: each names the previous one's hash and its own seq.
fn chained(first: u64, n: u64, prev: [u8; 32]) -> (u64, Vec<u8>) {
    let mut b = BlockBuf::default();
    let mut prev = prev;
    for seq in first..first + n {
        b.push(seq, 7, |out| {
            let text = format!(
                r#"{{"data":{{"note":"\"prev_hash\":\"x"}},"kind":"lease.issued","prev_hash":"{}","seq":{seq},"time":"t","v":1}}"#,
                crate::hex::encode(&prev)
            );
            out.extend_from_slice(text.as_bytes());
            prev = sha(text.as_bytes());
            prev
        });
    }
    b.take().unwrap()
}

#[test]
fn chain_links_are_left_out_and_put_back_exactly() {
    let (key, plain) = chained(41, 6, [9; 32]);
    let packed = pack(plain.clone());
    let header = u64::from_be_bytes(packed[..8].try_into().unwrap());
    assert_ne!(header & UNLINKED, 0, "the links were left out");
    assert_eq!(header & !(DEFLATED | UNLINKED | PRIMED), 41);
    assert_eq!(unpack(&packed).unwrap().as_ref(), plain.as_slice());
    // smaller than deflating with them
    let (_, body) = plain.split_at(HEADER);
    assert!(packed.len() < miniz_oxide::deflate::compress_to_vec(body, 1).len());
    // a link that is not what the chain says is kept as it is
    let (_, mut odd) = chained(41, 6, [9; 32]);
    let at = odd.windows(4).rposition(|w| w == b"\"seq").unwrap();
    odd[at + 7] = b'8';
    let packed = pack(odd.clone());
    let header = u64::from_be_bytes(packed[..8].try_into().unwrap());
    assert_eq!(header & UNLINKED, 0);
    assert_eq!(unpack(&packed).unwrap().as_ref(), odd.as_slice());
    // a stored hash changed: its own event no longer matches it, and
    // the next one's link now says so too
    let packed = pack(plain.clone());
    let len = u32::from_be_bytes(packed[HEADER..HEADER + 4].try_into().unwrap()) as usize;
    let mut body = inflate_primed(&packed[HEADER + 4 + 32..], len).unwrap();
    body[0] ^= 1;
    let mut forged = packed[..HEADER + 4 + 32].to_vec();
    forged.extend_from_slice(&deflate_primed(&body).unwrap());
    let got = unpack(&forged).unwrap();
    let events: Vec<Entry<'_>> = entries(key, &got).collect::<Result<_, _>>().unwrap();
    let want: Vec<Entry<'_>> = entries(key, &plain).collect::<Result<_, _>>().unwrap();
    assert_ne!(events[0].hash, sha(events[0].bytes));
    assert_ne!(events[1].bytes, want[1].bytes);
    assert_eq!(events[2].bytes, want[2].bytes);
}

/// A block as the format before the dictionary stored it.
fn pack_unprimed(plain: &[u8]) -> Vec<u8> {
    let first = u64::from_be_bytes(plain[..HEADER].try_into().unwrap());
    let (prev, body) = unlinked(first, &plain[HEADER..]).unwrap();
    let mut out = (first | DEFLATED | UNLINKED).to_be_bytes().to_vec();
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&prev);
    out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(&body, 1));
    out
}

/// A primed block as the format defines it: a fresh compressor, the
/// dictionary flushed to a byte boundary and dropped, then the body.
fn primed_by_definition(body: &[u8]) -> Vec<u8> {
    use miniz_oxide::deflate::core::{
        CompressorOxide, TDEFLFlush, compress_to_output, create_comp_flags_from_zip_params,
    };
    let mut c = CompressorOxide::new(create_comp_flags_from_zip_params(1, -15, 0));
    let _ = compress_to_output(&mut c, DICTIONARY, TDEFLFlush::Sync, |_| true);
    let mut out = Vec::new();
    compress_to_output(&mut c, body, TDEFLFlush::Finish, |b| {
        out.extend_from_slice(b);
        true
    });
    out
}

#[test]
fn every_block_starts_from_the_primed_state_and_nothing_of_the_one_before() {
    // blocks one after another on one thread: each is byte for byte what a
    // freshly primed compressor makes, whatever was deflated before it
    let bodies: Vec<Vec<u8>> = vec![
        br#"{"kind":"call.decided","data":{"tool":"demo.read"}}"#.to_vec(),
        (0..40)
            .flat_map(|i| format!(r#"{{"kind":"lease.issued","seq":{i}}}"#).into_bytes())
            .collect(),
        vec![0xA5; 3000],
        br#"{"kind":"call.decided","data":{"tool":"demo.read"}}"#.to_vec(),
    ];
    for body in &bodies {
        let made = deflate_primed(body).expect("deflates");
        assert_eq!(made, primed_by_definition(body));
        assert_eq!(inflate_primed(&made, body.len()).unwrap(), *body);
    }
    // and on another thread, its own primed compressor, the same bytes
    let b = bodies[1].clone();
    let there = std::thread::spawn(move || deflate_primed(&b).unwrap())
        .join()
        .unwrap();
    assert_eq!(there, primed_by_definition(&bodies[1]));
}

#[test]
fn the_dictionary_shrinks_a_block_and_older_blocks_still_read() {
    // the dictionary is part of the stored format: changing one byte
    // would make every block written with it unreadable
    assert_eq!(
        crate::hex::encode(&sha(DICTIONARY)),
        "b6d5ab769b60fb78c68e57c29a6444c8d5be2110427f88a1b47b555631e7402a"
    );
    let (key, plain) = chained(100, 15, [3; 32]);
    let primed = pack(plain.clone());
    let header = u64::from_be_bytes(primed[..8].try_into().unwrap());
    assert_eq!(
        header & (DEFLATED | UNLINKED | PRIMED),
        DEFLATED | UNLINKED | PRIMED
    );
    let old = pack_unprimed(&plain);
    assert!(
        primed.len() < old.len(),
        "{} against {}",
        primed.len(),
        old.len()
    );
    assert_eq!(unpack(&primed).unwrap().as_ref(), plain.as_slice());
    assert_eq!(unpack(&old).unwrap().as_ref(), plain.as_slice());
    assert_eq!(entries(key, &unpack(&old).unwrap()).count(), 15);
    // a primed stream read without its dictionary reaches back before
    // its start: refused, never other bytes
    let mut unprimed_flag = primed.clone();
    unprimed_flag[0] &= !((PRIMED >> 56) as u8);
    assert!(unpack(&unprimed_flag).is_err());
}

#[test]
fn what_a_prune_takes_is_read_from_the_heads_alike_in_every_format() {
    let mut b = BlockBuf::default();
    let mut prev = [5u8; 32];
    for (i, seq) in (200..212u64).enumerate() {
        let task = [0u128, 7, 9, 7][i % 4];
        b.push(seq, task, |out| {
            let text = format!(
                r#"{{"kind":"x","prev_hash":"{}","seq":{seq},"time":"t","v":1}}"#,
                crate::hex::encode(&prev)
            );
            out.extend_from_slice(text.as_bytes());
            prev = sha(text.as_bytes());
            prev
        });
    }
    let (key, plain) = b.take().unwrap();
    let formats = [plain.clone(), pack(plain.clone()), pack_unprimed(&plain)];
    for through in [199, 200, 201, 205, 211, 300] {
        // what walking the plain block finds
        let mut want = (0, Vec::new());
        for e in entries(key, &plain) {
            let e = e.unwrap();
            if e.seq > through {
                break;
            }
            want.0 += 1;
            if e.task != 0 && !want.1.iter().any(|(t, _)| *t == e.task) {
                want.1.push((e.task, e.seq));
            }
        }
        for stored in &formats {
            assert_eq!(
                pruned(key, stored, through).unwrap(),
                want,
                "through {through}"
            );
        }
    }
    assert_eq!(
        pruned(key, &formats[1], 300).unwrap().1,
        [(7, 201), (9, 202)]
    );
    let cut = &formats[1][..formats[1].len() - 4];
    assert!(pruned(key, cut, 300).is_err());
}

#[test]
fn an_empty_buffer_makes_no_block() {
    assert!(BlockBuf::default().take().is_none());
}

#[test]
fn what_remains_after_a_prune_is_a_block_with_the_same_key() {
    let (key, b) = block(1, &[("a", 1), ("b", 2), ("c", 3)]);
    let rest = after(key, &b, 1).unwrap().unwrap();
    let seqs: Vec<u64> = entries(key, &rest.block).map(|e| e.unwrap().seq).collect();
    assert_eq!(seqs, [2, 3]);
    assert_eq!(find(key, &rest.block, 3).unwrap().unwrap().hash, [3; 32]);
    assert_eq!(rest.firsts, [(2, 2), (3, 3)]);
    assert!(after(key, &b, 3).unwrap().is_none());
}

#[test]
fn a_malformed_block_is_an_error_never_a_short_answer() {
    let (key, b) = block(1, &[("abc", 1), ("def", 2)]);
    // cut anywhere: every cut is reported
    for cut in 0..b.len() {
        let r: Result<Vec<_>, _> = entries(key, &b[..cut]).collect();
        assert!(r.is_err(), "a block cut at {cut} bytes was accepted");
    }
    // stored under the wrong key
    assert!(entries(key + 1, &b).collect::<Result<Vec<_>, _>>().is_err());
    assert!(entries(key - 1, &b).collect::<Result<Vec<_>, _>>().is_err());
    // a length running past the end
    let mut long = b.clone();
    long[8 + 48..8 + 52].copy_from_slice(&1000u32.to_be_bytes());
    assert!(entries(key, &long).collect::<Result<Vec<_>, _>>().is_err());
}
