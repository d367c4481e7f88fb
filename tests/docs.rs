//! The documentation stays true to the code: every configuration key is in the reference in
//! docs/OPERATIONS.md, every metric the engine exports is listed there, and the README names
//! the test command CI runs.

use sipring::config::{CertConfig, Config, ListenConfig, PeerConfig};

fn repo(path: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path),
    )
    .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every key of a TOML table, dotted, with array-of-table entries under `name[]`.
fn keys(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
    if let toml::Value::Table(t) = v {
        for (k, v) in t {
            let name = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(_) => keys(&name, v, out),
                toml::Value::Array(a) if a.first().is_some_and(toml::Value::is_table) => {
                    keys(&name, &a[0], out)
                }
                _ => out.push(name),
            }
        }
    }
}

#[test]
fn every_config_key_is_documented() {
    // Array tables and optional keys appear only when present: fill one of each.
    let mut cfg = Config {
        listen: vec![ListenConfig::default()],
        peer: vec![PeerConfig {
            address: Some("127.0.0.1:1".parse().unwrap()),
            ..PeerConfig::default()
        }],
        ..Config::default()
    };
    cfg.tls.certificate = vec![CertConfig::default()];
    cfg.tls.client_roots = Some("x".into());
    cfg.listen[0].advertise = Some("sip.example.com".into());
    cfg.auth.subscribers = Some("x".into());
    cfg.auth.secret_file = Some("x".into());
    cfg.cluster = Some(sipring::config::ClusterConfig {
        nodes: vec![sipring::config::NodeConfig {
            address: Some("127.0.0.1:1".parse().unwrap()),
            ..Default::default()
        }],
        ..Default::default()
    });
    let value = toml::Value::try_from(&cfg).unwrap();
    let mut all = Vec::new();
    keys("", &value, &mut all);
    let ops = repo("docs/OPERATIONS.md");
    let mut missing = Vec::new();
    for k in &all {
        // `listen.kind` etc. come from arrays: the doc writes them as `[[listen]] kind`.
        let (table, key) = k.rsplit_once('.').unwrap_or(("", k));
        let documented =
            ops.contains(&format!("`{k}`")) || ops.contains(&format!("`[[{table}]] {key}`"));
        if !documented {
            missing.push(k.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "undocumented config keys (add them to docs/OPERATIONS.md): {missing:?}"
    );
    assert!(all.len() > 40, "walked only {} keys", all.len());
}

#[test]
fn every_exported_metric_is_documented() {
    let ops = repo("docs/OPERATIONS.md");
    let mut names = std::collections::BTreeSet::new();
    // Every engine source file, so a module split or a new module cannot hide a metric.
    let mut files = Vec::new();
    let mut dirs = vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    assert!(files.len() > 20, "found only {files:?}");
    for f in files {
        let src = std::fs::read_to_string(&f).unwrap();
        // Unit tests use made-up names.
        let src = src.split("#[cfg(test)]").next().unwrap_or_default();
        for part in src.split("\"sipring_").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(format!("sipring_{name}"));
        }
    }
    let missing: Vec<_> = names.iter().filter(|n| !ops.contains(n.as_str())).collect();
    assert!(
        missing.is_empty(),
        "metrics missing from docs/OPERATIONS.md: {missing:?}"
    );
    assert!(names.len() > 15, "found only {names:?}");
}

#[test]
fn readme_names_the_test_command_ci_runs() {
    let readme = repo("README.md");
    let ci = repo(".ci/run");
    assert!(readme.contains("tests/run.sh"));
    assert!(ci.contains("tests/run.sh"));
}
