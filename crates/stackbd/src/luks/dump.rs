//! `cryptsetup luksDump`-style text for both versions. Pure; allocates the text.

use super::luks1::Luks1Header;
use super::luks2::{Kdf, Luks2Header};
use std::fmt::Write;

/// Hex bytes separated by spaces, 16 per line, continuation lines indented by `indent`.
fn hex_lines(b: &[u8], indent: &str) -> String {
    let mut s = String::new();
    for (i, chunk) in b.chunks(16).enumerate() {
        if i > 0 {
            s.push('\n');
            s.push_str(indent);
        }
        let line: Vec<String> = chunk.iter().map(|x| format!("{x:02x}")).collect();
        s.push_str(&line.join(" "));
    }
    s
}

pub(crate) fn luks1(h: &Luks1Header) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "LUKS header information\n");
    let _ = writeln!(s, "Version:       \t1");
    let _ = writeln!(s, "Cipher name:   \t{}", h.cipher_name);
    let _ = writeln!(s, "Cipher mode:   \t{}", h.cipher_mode);
    let _ = writeln!(s, "Hash spec:     \t{}", h.hash_spec);
    let _ = writeln!(s, "Payload offset:\t{}", h.payload_offset);
    let _ = writeln!(s, "MK bits:       \t{}", u64::from(h.key_bytes) * 8);
    let _ = writeln!(
        s,
        "MK digest:     \t{}",
        hex_lines(&h.mk_digest, "               \t")
    );
    let _ = writeln!(
        s,
        "MK salt:       \t{}",
        hex_lines(&h.mk_digest_salt, "               \t")
    );
    let _ = writeln!(s, "MK iterations: \t{}", h.mk_digest_iterations);
    let _ = writeln!(s, "UUID:          \t{}\n", h.uuid);
    for (i, k) in h.keyslots.iter().enumerate() {
        if !k.active {
            let _ = writeln!(s, "Key Slot {i}: DISABLED");
            continue;
        }
        let _ = writeln!(s, "Key Slot {i}: ENABLED");
        let _ = writeln!(s, "\tIterations:         \t{}", k.iterations);
        let _ = writeln!(
            s,
            "\tSalt:               \t{}",
            hex_lines(&k.salt, "\t                    \t")
        );
        let _ = writeln!(s, "\tKey material offset:\t{}", k.key_material_offset);
        let _ = writeln!(s, "\tAF stripes:         \t{}", k.stripes);
    }
    s
}

fn or_none<'a>(v: &'a str, none: &'a str) -> &'a str {
    if v.is_empty() {
        none
    } else {
        v
    }
}

pub(crate) fn luks2(h: &Luks2Header) -> String {
    let m = &h.meta;
    let mut s = String::new();
    let _ = writeln!(s, "LUKS header information");
    let _ = writeln!(s, "Version:       \t2");
    let _ = writeln!(s, "Epoch:         \t{}", h.bin.seqid);
    let _ = writeln!(s, "Metadata area: \t{} [bytes]", h.bin.hdr_size);
    let _ = writeln!(s, "Keyslots area: \t{} [bytes]", m.config.keyslots_size);
    let _ = writeln!(s, "UUID:          \t{}", h.uuid);
    let _ = writeln!(s, "Label:         \t{}", or_none(&h.label, "(no label)"));
    let _ = writeln!(
        s,
        "Subsystem:     \t{}",
        or_none(&h.bin.subsystem, "(no subsystem)")
    );
    let flags = m.config.flags.join(" ");
    let _ = writeln!(s, "Flags:       \t{}", or_none(&flags, "(no flags)"));
    if !m.config.requirements.is_empty() {
        let _ = writeln!(s, "Requirements:\t{}", m.config.requirements.join(" "));
    }
    let _ = writeln!(s, "\nData segments:");
    for (id, seg) in &m.segments {
        let _ = writeln!(s, "  {id}: {}", seg.kind);
        let _ = writeln!(s, "\toffset: {} [bytes]", seg.offset);
        match seg.size {
            Some(n) => {
                let _ = writeln!(s, "\tlength: {n} [bytes]");
            }
            None => {
                let _ = writeln!(s, "\tlength: (whole device)");
            }
        }
        if seg.kind == "crypt" {
            let _ = writeln!(s, "\tcipher: {}", seg.encryption);
            let _ = writeln!(s, "\tsector: {} [bytes]", seg.sector_size);
            if seg.iv_tweak != 0 {
                let _ = writeln!(s, "\tIV tweak: {}", seg.iv_tweak);
            }
        }
        if !seg.flags.is_empty() {
            let _ = writeln!(s, "\tflags : {}", seg.flags.join(" "));
        }
    }
    let _ = writeln!(s, "\nKeyslots:");
    let digest_of = |slot: u32| {
        m.digests
            .iter()
            .find(|(_, d)| d.keyslots.contains(&slot))
            .map(|(i, _)| *i)
    };
    for (id, k) in &m.keyslots {
        let _ = writeln!(s, "  {id}: luks2");
        let _ = writeln!(s, "\tKey:        {} bits", u64::from(k.key_size) * 8);
        let prio = match k.priority {
            Some(0) => "ignored",
            Some(2) => "high",
            _ => "normal",
        };
        let _ = writeln!(s, "\tPriority:   {prio}");
        let _ = writeln!(s, "\tCipher:     {}", k.area.encryption);
        let _ = writeln!(s, "\tCipher key: {} bits", u64::from(k.area.key_size) * 8);
        match &k.kdf {
            Kdf::Pbkdf2 {
                hash,
                iterations,
                salt,
            } => {
                let _ = writeln!(s, "\tPBKDF:      pbkdf2");
                let _ = writeln!(s, "\tHash:       {hash}");
                let _ = writeln!(s, "\tIterations: {iterations}");
                let _ = writeln!(s, "\tSalt:       {}", hex_lines(salt, "\t            "));
            }
            Kdf::Argon2 {
                variant,
                time,
                memory_kib,
                cpus,
                salt,
            } => {
                let _ = writeln!(s, "\tPBKDF:      {}", variant.name());
                let _ = writeln!(s, "\tTime cost:  {time}");
                let _ = writeln!(s, "\tMemory:     {memory_kib}");
                let _ = writeln!(s, "\tThreads:    {cpus}");
                let _ = writeln!(s, "\tSalt:       {}", hex_lines(salt, "\t            "));
            }
        }
        let _ = writeln!(s, "\tAF stripes: {}", k.af.stripes);
        let _ = writeln!(s, "\tAF hash:    {}", k.af.hash);
        let _ = writeln!(s, "\tArea offset:{} [bytes]", k.area.offset);
        let _ = writeln!(s, "\tArea length:{} [bytes]", k.area.size);
        if let Some(d) = digest_of(*id) {
            let _ = writeln!(s, "\tDigest ID:  {d}");
        }
    }
    for (id, t) in &m.other_keyslots {
        let _ = writeln!(s, "  {id}: {t}");
    }
    let _ = writeln!(s, "Tokens:");
    for (id, t) in &m.tokens {
        let _ = writeln!(s, "  {id}: {t}");
    }
    let _ = writeln!(s, "Digests:");
    for (id, d) in &m.digests {
        let _ = writeln!(s, "  {id}: pbkdf2");
        let _ = writeln!(s, "\tHash:       {}", d.hash);
        let _ = writeln!(s, "\tIterations: {}", d.iterations);
        let _ = writeln!(s, "\tSalt:       {}", hex_lines(&d.salt, "\t            "));
        let _ = writeln!(
            s,
            "\tDigest:     {}",
            hex_lines(&d.digest, "\t            ")
        );
    }
    s
}
