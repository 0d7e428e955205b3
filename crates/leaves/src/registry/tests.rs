use super::*;

fn table(text: &str) -> Table {
    toml::from_str(text).unwrap()
}

/// Every parameter of every kind, none at its default.
const EVERY_KIND: &[(&str, &str)] = &[
    ("mem", "size = \"3MiB\""),
    ("null", "size = 1536"),
    (
        "file",
        "path = \"/tmp/x direct\"\ndirect = false\nqueue_depth = 8",
    ),
    (
        "file",
        "path = \"/tmp/y\"\ndirect = true\nqueue_depth = 4096",
    ),
    (
        "nbd",
        "uri = \"nbds+unix:///e?socket=/s\"\nconnections = 2\ntimeout = \"1500ms\"\n\
         tls_certificates = \"/pki\"\ntls_psk_file = \"/k.psk\"\ntls_username = \"alice\"",
    ),
    (
        "powercut",
        "size = \"1MiB\"\nseed = 7\ntear = true\nreorder = true\ncut_after = 100\n\
         cut_random = \"5..9\"\nimage = \"/tmp/pc.img\"",
    ),
];

#[test]
fn every_kind_round_trips() {
    for k in KINDS {
        assert!(
            EVERY_KIND.iter().any(|(n, _)| *n == k.name),
            "kind {} has no round-trip case",
            k.name
        );
    }
    for (kind_name, text) in EVERY_KIND {
        let p = parse(kind_name, &table(text)).unwrap();
        // Printed as the config writes it: exactly the input lines, in field order.
        assert_eq!(p.to_toml(), format!("kind = \"{kind_name}\"\n{text}\n"));
        // And read back: the same parameters.
        let mut back = table(&p.to_toml());
        assert_eq!(
            back.remove("kind"),
            Some(Value::String(kind_name.to_string()))
        );
        assert_eq!(parse(kind_name, &back).unwrap(), p);
        // FIELDS lists exactly what the typed struct serializes, in its order.
        let keys: Vec<&str> = p.values().map(|(k, _)| k).collect();
        let fields: Vec<&str> = p.kind().fields.iter().map(|f| f.key).collect();
        assert_eq!(keys, fields, "{kind_name}");
        assert_eq!(p.table().len(), fields.len(), "{kind_name}");
    }
}

#[test]
fn typed_params_are_kept_exactly() {
    let p = parse("file", &table(EVERY_KIND[2].1)).unwrap();
    assert_eq!(
        p.typed::<FileParams>().unwrap(),
        FileParams {
            path: "/tmp/x direct".into(),
            direct: false,
            queue_depth: 8,
        }
    );
    let n: NbdParams = parse("nbd", &table(EVERY_KIND[4].1))
        .unwrap()
        .typed()
        .unwrap();
    assert_eq!(n.connections, 2);
    assert_eq!(n.timeout.get(), std::time::Duration::from_millis(1500));
    // From typed parameters: the same as from the table.
    let q = LeafParams::from_typed::<Nbd>(&n).unwrap();
    assert_eq!(q, parse("nbd", &table(EVERY_KIND[4].1)).unwrap());
}

#[test]
fn defaults_are_filled_in() {
    let p = parse("file", &table("path = \"/x\"")).unwrap();
    assert_eq!(p.summary(), "path=\"/x\" direct=false queue_depth=256");
    let p = parse("nbd", &table("uri = \"nbd://h/e\"")).unwrap();
    assert_eq!(
        p.summary(),
        "uri=\"nbd://h/e\" connections=1 timeout=\"30s\""
    );
    // Sizes and durations print canonically.
    let p = parse("mem", &table("size = 1073741824")).unwrap();
    assert_eq!(p.to_toml(), "kind = \"mem\"\nsize = \"1GiB\"\n");
    let p = parse("nbd", &table("uri = \"nbd://h/e\"\ntimeout = \"1.5s\"")).unwrap();
    assert_eq!(p.get("timeout"), Some(&Value::String("1500ms".into())));
}

#[test]
fn every_error_is_reported() {
    let e = parse(
        "file",
        &table("direct = \"yes\"\nqueue_depth = 0\nsize = 4096"),
    )
    .unwrap_err();
    let LeafError::Params(k, errs) = e else {
        panic!("{e}")
    };
    let texts: Vec<String> = errs.iter().map(|e| e.config_text(k)).collect();
    assert_eq!(
        texts,
        [
            "unknown key 'size' (file leaves take: kind, path, direct, queue_depth)",
            "missing 'path' (file leaves take: kind, path, direct, queue_depth)",
            "direct: expected true or false, got string",
            "queue_depth: 0 is out of range (1..=4096)",
        ]
    );
    assert_eq!(errs[0].key(), Some("size"));
}

#[test]
fn bad_numbers_are_errors_not_panics() {
    let bad = |kind: &str, text: &str, want: &str| {
        let e = parse(kind, &table(text)).unwrap_err().to_string();
        assert!(e.contains(want), "{kind} {text}: {e}");
    };
    bad("mem", "size = \"99999999999T\"", "too large");
    bad("mem", "size = -512", "negative");
    bad("mem", "size = 0", "cannot be empty");
    bad("null", "size = 1000", "512-byte sectors");
    bad("null", "size = 1.5", "invalid size");
    bad("file", "path = \"\"", "path: empty");
    bad(
        "file",
        "path = \"/x\"\nqueue_depth = 4097",
        "out of range (1..=4096)",
    );
    bad(
        "file",
        "path = \"/x\"\nqueue_depth = 9223372036854775807",
        "out of range",
    );
    bad("nbd", "uri = \"http://x\"", "uri:");
    bad(
        "nbd",
        "uri = \"nbd://h/e\"\nconnections = 65",
        "out of range (1..=64)",
    );
    bad(
        "nbd",
        "uri = \"nbd://h/e\"\nconnections = -1",
        "out of range",
    );
    bad(
        "nbd",
        "uri = \"nbd://h/e\"\ntimeout = \"5 parsecs\"",
        "timeout: invalid",
    );
    bad(
        "nbd",
        "uri = \"nbd://h/e\"\ntimeout = 9223372036854775807",
        "at most 86400s",
    );
    bad(
        "nbd",
        "uri = \"nbd://h/e\"\ntimeout = \"99999999999999h\"",
        "timeout:",
    );
    bad("nbd", "uri = \"nbd://h/e\"\ntimeout = \"1e9s\"", "timeout:");
    bad("nbd", "connections = 2", "missing 'uri'");
}

#[test]
fn unknown_kind_is_an_error() {
    let e = parse("tape", &Table::new()).unwrap_err();
    assert!(matches!(e, LeafError::UnknownKind(_)));
    assert_eq!(
        e.to_string(),
        "unknown kind 'tape' (known: mem, null, file, nbd, powercut)"
    );
}

#[test]
fn json_parameters_go_through_the_same_parse() {
    #[derive(Serialize)]
    struct J {
        path: &'static str,
        direct: bool,
        queue_depth: u64,
    }
    let t = table_from_json(&J {
        path: "/x",
        direct: true,
        queue_depth: 16,
    })
    .unwrap();
    let p = parse("file", &t).unwrap();
    assert_eq!(p.summary(), "path=\"/x\" direct=true queue_depth=16");
    assert!(table_from_json(&3).is_err());
}

#[test]
fn relative_paths_resolve_against_a_base() {
    let mut p = parse("file", &table("path = \"d/disk.img\"")).unwrap();
    assert_eq!(p.paths(), [("path", PathBuf::from("d/disk.img"))]);
    p.resolve_paths(Path::new("/etc/stackbd"));
    assert_eq!(
        p.paths(),
        [("path", PathBuf::from("/etc/stackbd/d/disk.img"))]
    );
    let mut q = parse("file", &table("path = \"/abs\"")).unwrap();
    q.resolve_paths(Path::new("/etc"));
    assert_eq!(q.paths(), [("path", PathBuf::from("/abs"))]);
}

#[test]
fn builds_leaves() {
    let p = parse("null", &table("size = \"1MiB\"")).unwrap();
    let l = p.build().unwrap();
    assert_eq!((l.kind(), l.size()), ("null", 2048));
    let p = parse("mem", &table("size = 4096")).unwrap();
    assert_eq!(p.build().unwrap().size(), 8);
    let p = parse("file", &table("path = \"/nonexistent/stackbd.img\"")).unwrap();
    let e = p.build().err().unwrap().to_string();
    assert!(e.starts_with("/nonexistent/stackbd.img: "), "{e}");
}

#[test]
fn powercut_params_defaults_and_errors() {
    let p = parse("powercut", &table("size = 1048576")).unwrap();
    assert_eq!(
        p.to_toml(),
        "kind = \"powercut\"\nsize = \"1MiB\"\nseed = 0\ntear = false\nreorder = false\n"
    );
    let t: PowerCutParams = p.typed().unwrap();
    assert_eq!((t.cut_after, t.cut_random, t.image), (None, None, None));
    // An image alone is enough: the size comes from it.
    assert!(parse("powercut", &table("image = \"/x.img\"")).is_ok());
    let bad = |text: &str, want: &str| {
        let e = parse("powercut", &table(text)).unwrap_err().to_string();
        assert!(e.contains(want), "{text}: {e}");
    };
    bad(
        "seed = 1",
        "size: missing: a powercut leaf needs a size, or an image",
    );
    bad(
        "size = 4096\ncolour = 1",
        "unknown key 'colour' (powercut leaves take: kind, size, seed, tear, reorder, \
         cut_after, cut_random, image)",
    );
    bad(
        "size = 4096\ncut_random = \"9..5\"",
        "cut_random: '9..5': LO (9) is more than HI (5)",
    );
    bad(
        "size = 4096\ncut_random = \"9\"",
        "cut_random: '9': expected LO..HI",
    );
    bad(
        "size = 4096\ncut_random = \"1..x\"",
        "'x' is not a whole number",
    );
    bad(
        "size = 4096\ncut_random = \"-1..2\"",
        "'-1' is not a whole number",
    );
    bad("size = 4096\ncut_random = 5", "expected a string");
    bad(
        "size = 4096\ncut_after = -1",
        "cut_after: -1 is out of range",
    );
    bad("size = 4096\nseed = -7", "seed: -7 is out of range");
    bad("size = 4096\ntear = 1", "tear: expected true or false");
    bad("size = 1000", "512-byte sectors");
    bad(
        "size = \"5GiB\"",
        "too large for a powercut leaf (at most 4GiB",
    );
    bad("size = 4096\nimage = \"\"", "image: empty");
}

#[test]
fn powercut_builds_and_boots_from_an_image() {
    let dir = std::env::temp_dir().join(format!("stackbd-reg-pc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Every option reaches the leaf.
    let text = "size = \"64KiB\"\nseed = 3\ntear = true\nreorder = true\ncut_after = 9\n\
                cut_random = \"4..6\"";
    let l = parse("powercut", &table(text)).unwrap().build().unwrap();
    assert_eq!((l.kind(), l.size()), ("powercut", 128));
    assert_eq!(
        l.args(),
        "64KiB seed=3 tear reorder cut_after=9 cut_random=4..6"
    );
    // An image: the size comes from it, and its bytes are the device's.
    let img = dir.join("pc.img");
    let mut bytes = vec![0u8; 8192];
    bytes[4096..].fill(0x5a);
    std::fs::write(&img, &bytes).unwrap();
    let from = |text: String| parse("powercut", &table(&text)).unwrap().build();
    let l = from(format!("image = {:?}", img.to_str().unwrap())).unwrap();
    assert_eq!(l.size(), 16);
    let saved = dir.join("saved.img");
    let r = l.message(&["save", saved.to_str().unwrap()]).unwrap();
    assert!(r.contains("8192 bytes"), "{r}");
    assert_eq!(std::fs::read(&saved).unwrap(), bytes);
    assert!(from(format!("size = 8192\nimage = {:?}", img.to_str().unwrap())).is_ok());
    // A size that does not match, an image that is missing or not whole sectors: errors.
    let e = from(format!(
        "size = \"1MiB\"\nimage = {:?}",
        img.to_str().unwrap()
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("the image is 8KiB (8192 bytes) but size says 1MiB (1048576 bytes)"),
        "{e}"
    );
    let e = from(format!(
        "image = {:?}",
        dir.join("nope.img").to_str().unwrap()
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("nope.img: No such file"), "{e}");
    std::fs::write(&img, [1u8; 1000]).unwrap();
    let e = from(format!("image = {:?}", img.to_str().unwrap()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a whole number of 512-byte sectors"), "{e}");
    std::fs::write(&img, []).unwrap();
    let e = from(format!("image = {:?}", img.to_str().unwrap()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cannot be empty"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
