use super::*;

#[test]
fn human() {
    assert_eq!(human_bytes(0), "0 B");
    assert_eq!(human_bytes(512), "512 B");
    assert_eq!(human_bytes(1 << 30), "1 GiB");
    assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    assert_eq!(human_bytes(4194304 * 512), "2 GiB");
    assert_eq!(human_bytes(1 << 62), "4 EiB");
    assert_eq!(human_bytes(1536), "1.5 KiB");
}

#[test]
fn reads_leaves_through_the_registry() {
    let text =
        "[leaf.n]\nkind = \"nbd\"\nuri = \"nbd://h:99/e\"\nconnections = 2\ntimeout = \"500ms\"\n";
    let cfg = parse(text, None).unwrap();
    let p = &cfg.leaves[0].params;
    assert_eq!(p.kind_name(), "nbd");
    assert_eq!(
        p.summary(),
        "uri=\"nbd://h:99/e\" connections=2 timeout=\"500ms\""
    );
    assert!(parse("[leaf.n]\nkind = \"nbd\"\nuri = \"http://x\"\n", None).is_err());
    assert!(parse("[leaf.n]\nkind = \"nbd\"\n", None).is_err());
    // Relative paths are relative to the config file's folder.
    let text = "[leaf.f]\nkind = \"file\"\npath = \"d.img\"\nqueue_depth = 8\n";
    let cfg = parse(text, Some(Path::new("/etc/sbd/x.toml"))).unwrap();
    assert_eq!(
        cfg.leaves[0].params.summary(),
        "path=\"/etc/sbd/d.img\" direct=false queue_depth=8"
    );
}

#[test]
fn leaf_errors_are_on_their_key_lines() {
    let text = "[leaf.r]\nkind = \"nbd\"\nconnections = 0\ntimeout = \"9999999999999999999s\"\n";
    let e = parse(text, None).unwrap_err().to_string();
    assert_eq!(
        e,
        "2: [leaf.r]: missing 'uri' (nbd leaves take: kind, uri, connections, timeout, \
         tls_certificates, tls_psk_file, tls_username)\n\
         3: [leaf.r]: connections: 0 is out of range (1..=64)\n\
         4: [leaf.r]: timeout: invalid duration '9999999999999999999s': at most 86400s (one day)"
    );
}

#[test]
fn orders_volumes_by_dependency_in_file_order() {
    let text = r#"
        [leaf.m0]
        kind = "null"
        size = "1M"
        [volume.top]
        table = "0 8 linear mid 0"
        [volume.mid]
        table = "0 8 linear m0 0"
        [volume.side]
        table = "0 8 zero"
    "#;
    let b = check_text(text, None, ReactorConfig::default()).unwrap();
    assert_eq!(b.order, ["mid", "top", "side"]);
    let cfg = parse(text, None).unwrap();
    assert_eq!(cfg.volumes[0].name, "top");
    assert_eq!(cfg.volumes[0].line, 6);
    assert_eq!(
        build(&cfg, ReactorConfig::default()).unwrap().order,
        b.order
    );
}

#[test]
fn maps_table_lines_to_file_lines() {
    let text = "[volume.v]\ntable = \"\"\"\n0 8 zero\n16 8 zero\n\"\"\"\n";
    let e = check_text(text, None, ReactorConfig::default())
        .err()
        .unwrap();
    assert_eq!(e.len(), 1);
    assert_eq!(e.0[0].line, Some(4), "{e}");
    assert!(matches!(&e.0[0].kind, ErrorKind::Table(t) if t.line == 2));
    // Escapes break the mapping: fall back to the `table =` line.
    let text = "[volume.v]\ntable = \"0 8 zero\\n16 8 zero\"\n";
    let e = check_text(text, None, ReactorConfig::default())
        .err()
        .unwrap();
    assert_eq!(e.0[0].line, Some(2), "{e}");
}

#[test]
fn reports_a_cycle_once_with_its_path() {
    let text = r#"
        [volume.a]
        table = "0 8 linear b 0"
        [volume.b]
        table = "0 8 linear c 0"
        [volume.c]
        table = "0 8 linear a 0"
        [volume.d]
        table = "0 8 linear a 0"
    "#;
    let e = check_text(text, None, ReactorConfig::default())
        .err()
        .unwrap();
    let msgs: Vec<String> = e.iter().map(|e| e.to_string()).collect();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(msgs[0].ends_with("volume 'a' would stack on itself: a -> b -> c -> a"));
    assert!(msgs[1].contains("skipped: it uses volume 'a', which is in a cycle"));
}

#[test]
fn strict_parse_refuses_what_check_reports() {
    let text = "[leaf.m0]\nkind = \"mem\"\nsize = \"1GB\"\ncolour = 1\n";
    let e = parse(text, Some(Path::new("x.toml"))).unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("x.toml:3: [leaf.m0]: size: invalid size '1GB'"),
        "{s}"
    );
    assert!(
        s.contains("x.toml:4: [leaf.m0]: unknown key 'colour'"),
        "{s}"
    );
}

#[test]
fn empty_sections_point_at_their_header() {
    let text = "[leaf.m0]\nkind = \"null\"\nsize = 4096\n\n[leaf.x]\n";
    let e = parse(text, None).unwrap_err();
    assert_eq!(e.len(), 1);
    assert_eq!(e.0[0].line, Some(5));
    assert_eq!(
        e.0[0].to_string(),
        "5: [leaf.x]: missing 'kind' (one of: mem, null, file, nbd, powercut)"
    );
}

#[test]
fn load_names_the_path_and_the_toml_location() {
    let dir = std::env::temp_dir().join(format!("stackbd-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[volume.v]\ntable = \"0 8 zero\"\ntable = \"x\"\n").unwrap();
    let e = load(&path).unwrap_err();
    let s = e.to_string();
    assert!(s.starts_with(&format!("{}:3:1: ", path.display())), "{s}");
    assert!(s.contains("duplicate key"), "{s}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn quotes_section_names_toml_would_quote() {
    assert_eq!(
        Section::Volume("a-b_1".into()).to_string(),
        "[volume.a-b_1]"
    );
    assert_eq!(Section::Leaf("a.b".into()).to_string(), "[leaf.\"a.b\"]");
}
