//! The committed CRD YAML under `crds/` must match the Rust types.

#[test]
fn committed_crds_match_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, text) in kubevmm_crds::crd::rendered().expect("CRDs render") {
        let path = dir.join(&name);
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{} missing ({e}); run `make crds` and commit it",
                path.display()
            )
        });
        assert!(
            committed == text,
            "{} differs from the types in crds/src; run `make crds` and commit the result",
            path.display()
        );
    }
}

#[test]
fn no_stray_crd_files() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let expected: Vec<String> = kubevmm_crds::crd::rendered()
        .expect("render")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for entry in std::fs::read_dir(dir).expect("crds/") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if std::path::Path::new(&name)
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml"))
        {
            assert!(
                expected.contains(&name),
                "crds/{name} is not generated from the types; remove it"
            );
        }
    }
}
