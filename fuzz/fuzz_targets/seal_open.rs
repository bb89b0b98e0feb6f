//! The sealed envelope (src/seal.rs): opening arbitrary bytes, with and
//! without a key, never panics; a message sealed under the key opens to
//! exactly what was sealed, and any change to it (a changed, cut or added
//! byte, another channel, another request's nonce, another key) is refused.
#![no_main]
use libfuzzer_sys::fuzz_target;
use walcast::seal::{Channel, Sealer, NONCE_LEN, OVERHEAD};

const CHANNELS: [Channel; 3] = [Channel::Live, Channel::Request, Channel::Reply];

fuzz_target!(|data: &[u8]| {
    let Some((head, msg)) = data.split_first_chunk::<4>() else { return };
    let key = [head[0]; 32];
    let (with_key, other_key, none) = (Sealer::with_key(&key), Sealer::with_key(&[!head[0]; 32]), Sealer::default());
    let channel = CHANNELS[head[1] as usize % 3];
    let bound = [head[2]; NONCE_LEN];

    // Arbitrary bytes: refused with a key (forging needs the key), passed
    // through without one unless they look sealed.
    assert!(with_key.open(channel, &bound, msg).is_err(), "arbitrary bytes authenticated");
    if let Ok((plain, nonce)) = none.open(channel, &bound, msg) {
        assert_eq!((&plain[..], nonce), (msg, [0; NONCE_LEN]));
    }

    let (sealed, nonce) = with_key.seal(channel, &bound, msg);
    assert_eq!(sealed.len(), msg.len() + OVERHEAD);
    let (plain, opened_nonce) = with_key.open(channel, &bound, &sealed).expect("a sealed message opens");
    assert_eq!((&plain[..], opened_nonce), (msg, nonce));
    assert!(other_key.open(channel, &bound, &sealed).is_err(), "opened under another key");
    assert!(none.open(channel, &bound, &sealed).is_err(), "a keyless side took a sealed message");
    let other_channel = CHANNELS[(head[1] as usize + 1) % 3];
    assert!(with_key.open(other_channel, &bound, &sealed).is_err(), "opened on another channel");
    let mut other_bound = bound;
    other_bound[head[3] as usize % NONCE_LEN] ^= 1;
    assert!(with_key.open(channel, &other_bound, &sealed).is_err(), "opened bound to another nonce");

    // One change the input chooses: flip bits of a byte, cut, or append.
    let mut damaged = sealed.to_vec();
    let at = head[3] as usize * 7 % damaged.len();
    match head[1] / 3 % 3 {
        0 => damaged[at] ^= head[2] | 1,
        1 => damaged.truncate(at),
        _ => damaged.push(head[2]),
    }
    assert!(with_key.open(channel, &bound, &damaged).is_err(), "a changed message opened");
});
