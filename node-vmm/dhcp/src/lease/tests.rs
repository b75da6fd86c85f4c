//! Unit tests of the lease table.

use super::*;

fn cfg(prefix: u8) -> Config {
    Config::new(
        Ipv4Addr::new(10, 9, 0, 0),
        prefix,
        Ipv4Addr::new(10, 9, 0, 1),
        vec![],
        Duration::from_secs(3600),
        None,
        None,
    )
    .unwrap()
}

fn tmpdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kubevmm-dhcp-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

const T0: Duration = Duration::from_secs(1_700_000_000);

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + T0 + Duration::from_secs(secs)
}

#[test]
fn mac_round_trip() {
    let mac = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
    assert_eq!(format_mac(&mac), "52:54:00:ab:cd:ef");
    assert_eq!(parse_mac("52:54:00:AB:CD:EF"), Some(mac));
    assert_eq!(parse_mac("52-54-00-ab-cd-ef"), Some(mac));
    assert_eq!(parse_mac("52:54:00:ab:cd"), None);
    assert_eq!(parse_mac("52:54:00:ab:cd:ef:00"), None);
    assert_eq!(parse_mac("52:54:00:ab:cd:e"), None);
    assert_eq!(parse_mac("52:54:00:ab:cd:+f"), None);
}

#[test]
fn reserve_is_stable_and_owned() {
    let mut t = Leases::empty(Path::new("/nonexistent/leases.json"), &cfg(24));
    let a = [2, 0, 0, 0, 0, 1];
    let b = [2, 0, 0, 0, 0, 2];
    let ip_a = t.reserve(a, "ns/vm/net0", "vm").unwrap();
    assert_eq!(ip_a, Ipv4Addr::new(10, 9, 0, 2), "lowest after the gateway");
    assert_eq!(t.reserve(a, "ns/vm/net0", "vm-renamed").unwrap(), ip_a);
    assert_eq!(t.get(a).unwrap().hostname.as_deref(), Some("vm-renamed"));
    match t.reserve(a, "ns/other/net0", "x") {
        Err(DhcpError::MacInUse { owner }) => assert_eq!(owner, "ns/vm/net0"),
        other => panic!("{other:?}"),
    }
    let ip_b = t.reserve(b, "ns/vm/net1", "").unwrap();
    assert_ne!(ip_a, ip_b);
    assert_eq!(t.get(b).unwrap().hostname, None);
    assert!(matches!(
        t.reserve(b, "", "x"),
        Err(DhcpError::InvalidOwner)
    ));
    assert!(matches!(
        t.reserve([2, 0, 0, 0, 0, 3], "o", "bad_name"),
        Err(DhcpError::InvalidHostname(_))
    ));
    t.forget(a);
    assert!(t.get(a).is_none());
    assert_eq!(
        t.reserve(a, "ns/vm/net0", "vm").unwrap(),
        ip_a,
        "freed, lowest again"
    );
}

#[test]
fn forget_owner_prefix_is_path_aware() {
    let mut t = Leases::empty(Path::new("x.json"), &cfg(24));
    t.reserve([2, 0, 0, 0, 0, 1], "ns/vm/net0", "").unwrap();
    t.reserve([2, 0, 0, 0, 0, 2], "ns/vm/net1", "").unwrap();
    t.reserve([2, 0, 0, 0, 0, 3], "ns/vm2/net0", "").unwrap();
    t.forget_owner_prefix("ns/vm");
    let owners: Vec<_> = t.entries().filter_map(|(_, l)| l.owner.clone()).collect();
    assert_eq!(owners, ["ns/vm2/net0"]);
    t.forget_owner_prefix("ns/");
    assert!(t.is_empty());
    t.reserve([2, 0, 0, 0, 0, 1], "ns/a/net0", "").unwrap();
    t.reserve([2, 0, 0, 0, 0, 2], "ns/b/net0", "").unwrap();
    assert_eq!(t.retain_reserved(|_, o| o.starts_with("ns/a/")), 1);
    assert_eq!(t.len(), 1);
}

#[test]
fn pool_exhaustion_names_the_subnet() {
    // /30: two host addresses, one is the gateway.
    let mut t = Leases::empty(Path::new("x.json"), &cfg(30));
    assert_eq!(
        t.reserve([2, 0, 0, 0, 0, 1], "a", "").unwrap(),
        Ipv4Addr::new(10, 9, 0, 2)
    );
    let err = t.reserve([2, 0, 0, 0, 0, 2], "b", "").unwrap_err();
    assert!(matches!(&err, DhcpError::PoolExhausted { subnet } if subnet == "10.9.0.0/30"));
    assert!(err.to_string().contains("10.9.0.0/30"), "{err}");
}

#[test]
fn dynamic_leases_are_reclaimed_after_expiry_and_grace() {
    let mut t = Leases::empty(Path::new("x.json"), &cfg(30));
    let dynamic = [2, 0, 0, 0, 0, 9];
    let ip = t.offer(dynamic, None, at(0)).unwrap();
    assert!(t.bind(dynamic, at(1), Duration::from_secs(100)));
    assert!(!t.bind(dynamic, at(2), Duration::from_secs(100)), "renewal");
    assert_eq!(t.bound_at(dynamic, at(50)), Some(ip));
    assert_eq!(t.bound_at(dynamic, at(200)), None, "ended");
    // Ended but within the grace: still held.
    assert!(t.reserve_at([2, 0, 0, 0, 0, 1], "a", "", at(150)).is_err());
    // After the grace: reclaimed for the reservation.
    assert_eq!(
        t.reserve_at([2, 0, 0, 0, 0, 1], "a", "", at(200)).unwrap(),
        ip
    );
    assert!(t.get(dynamic).is_none());
}

#[test]
fn decline_quarantines_and_moves_the_reservation() {
    let mut t = Leases::empty(Path::new("x.json"), &cfg(29));
    let mac = [2, 0, 0, 0, 0, 1];
    let first = t.reserve_at(mac, "a", "", at(0)).unwrap();
    assert!(t.decline(mac, first, at(10)));
    assert_eq!(t.get(mac).unwrap().state, LeaseState::Declined);
    let second = t.offer(mac, None, at(11)).unwrap();
    assert_ne!(first, second);
    assert_eq!(
        t.reserve_at(mac, "a", "", at(12)).unwrap(),
        second,
        "the new stable one"
    );
    // Quarantine over: the declined address is free for others.
    let later = at(10) + DECLINE_QUARANTINE;
    assert_eq!(
        t.reserve_at([2, 0, 0, 0, 0, 2], "b", "", later).unwrap(),
        first
    );
}

#[test]
fn save_load_round_trip_and_drops() {
    let dir = tmpdir("roundtrip");
    let path = dir.join("sub").join("leases.json");
    let c = cfg(24);
    let mut t = Leases::load(&path, &c).unwrap();
    assert!(t.is_empty(), "a missing file is an empty table");
    let mac = [0x52, 0x54, 0, 1, 2, 3];
    let ip = t.reserve(mac, "ns/vm/net0", "vm").unwrap();
    t.offer([2, 0, 0, 0, 0, 7], None, at(0)).unwrap();
    t.bind([2, 0, 0, 0, 0, 7], at(0), Duration::from_secs(60));
    t.save().unwrap();
    let back = Leases::load(&path, &c).unwrap();
    assert_eq!(
        back.entries().collect::<Vec<_>>(),
        t.entries().collect::<Vec<_>>()
    );
    assert!(back.dropped().is_empty());
    // The same MAC keeps its address after a reload.
    let mut back = back;
    assert_eq!(back.reserve(mac, "ns/vm/net0", "vm").unwrap(), ip);
    // Another subnet: everything is dropped, with reasons.
    let other = Config::new(
        Ipv4Addr::new(10, 8, 0, 0),
        24,
        Ipv4Addr::new(10, 8, 0, 1),
        vec![],
        Duration::from_secs(60),
        None,
        None,
    )
    .unwrap();
    let moved = Leases::load(&path, &other).unwrap();
    assert!(moved.is_empty());
    assert_eq!(moved.dropped().len(), 2);
    assert!(moved.dropped()[0].why.contains("outside 10.8.0.0/24"));
    assert_eq!(moved.dropped()[0].owner.as_deref(), Some("ns/vm/net0"));
    // No temporary file is left behind.
    let names: Vec<_> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["leases.json"]);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn load_rejects_garbage_and_drops_conflicts() {
    let dir = tmpdir("garbage");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("leases.json");
    fs::write(&path, b"{not json").unwrap();
    assert!(matches!(
        Leases::load(&path, &cfg(24)),
        Err(DhcpError::Corrupt { .. })
    ));
    fs::write(&path, br#"{"version":9,"subnet":"x","leases":[]}"#).unwrap();
    assert!(matches!(
        Leases::load(&path, &cfg(24)),
        Err(DhcpError::Corrupt { .. })
    ));
    fs::write(
        &path,
        br#"{"version":1,"subnet":"10.9.0.0/24","leases":[
          {"mac":"02:00:00:00:00:01","ip":"10.9.0.5","state":"bound","expires":1},
          {"mac":"02:00:00:00:00:02","ip":"10.9.0.5","owner":"a","state":"reserved"},
          {"mac":"02:00:00:00:00:03","ip":"10.9.0.1","owner":"b","state":"reserved"},
          {"mac":"zz","ip":"10.9.0.6","owner":"c","state":"reserved"},
          {"mac":"02:00:00:00:00:04","ip":"10.9.0.7","state":"reserved"}
        ],"declined":[{"ip":"10.9.0.9","until":99999999999}]}"#,
    )
    .unwrap();
    let t = Leases::load(&path, &cfg(24)).unwrap();
    let kept: Vec<_> = t.entries().map(|(m, l)| (*m, l.ip)).collect();
    assert_eq!(
        kept,
        [([2, 0, 0, 0, 0, 2], Ipv4Addr::new(10, 9, 0, 5))],
        "the reservation wins"
    );
    assert_eq!(t.dropped().len(), 4);
    assert_eq!(t.quarantined().count(), 1);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dynamic_leases_are_limited_to_half_the_pool() {
    // /28: 13 leasable addresses, at most 7 dynamic.
    let mut t = Leases::empty(Path::new("x.json"), &cfg(28));
    assert_eq!(t.max_dynamic(), 7);
    for n in 0..7 {
        t.offer([2, 0, 0, 0, 1, n], None, at(0)).unwrap();
    }
    let err = t.offer([2, 0, 0, 0, 1, 7], None, at(0)).unwrap_err();
    assert!(
        matches!(err, DhcpError::DynamicLimit { limit: 7, .. }),
        "{err}"
    );
    // Holders ask again: still answered. Reservations still get addresses.
    assert!(t.offer([2, 0, 0, 0, 1, 0], None, at(1)).is_ok());
    for n in 0..6 {
        t.reserve_at([2, 0, 0, 0, 2, n], "vm", "", at(1)).unwrap();
    }
    // Once the offers end, new unknown MACs are served again.
    assert!(t
        .offer([2, 0, 0, 0, 1, 7], None, at(0) + OFFER_HOLD)
        .is_ok());
    t.set_max_dynamic(0);
    assert!(t
        .offer([2, 0, 0, 0, 1, 8], None, at(0) + OFFER_HOLD)
        .is_err());
}

#[test]
fn purge_tidies_ended_offers_leases_and_quarantines() {
    let mut t = Leases::empty(Path::new("x.json"), &cfg(24));
    let vm = [2, 0, 0, 0, 0, 1];
    let other = [2, 0, 0, 0, 0, 2];
    let ip = t.reserve_at(vm, "ns/vm/net0", "", at(0)).unwrap();
    t.offer(vm, None, at(0)).unwrap();
    t.offer(other, None, at(0)).unwrap();
    t.bind(other, at(0), Duration::from_secs(100));
    assert!(!t.purge(at(1)), "nothing ended yet");
    assert!(t.purge(at(0) + OFFER_HOLD));
    let lease = t.get(vm).unwrap();
    assert_eq!(
        (lease.ip, lease.state, lease.expires),
        (ip, LeaseState::Reserved, None)
    );
    assert!(t.get(other).is_some(), "bound, within its lease");
    t.bind(vm, at(100), Duration::from_secs(100));
    t.decline(other, t.get(other).unwrap().ip, at(100));
    assert_eq!(t.quarantined().count(), 1);
    let later = at(200) + EXPIRY_GRACE + DECLINE_QUARANTINE;
    assert!(t.purge(later));
    assert!(t.get(other).is_none());
    assert_eq!(t.get(vm).unwrap().state, LeaseState::Reserved);
    assert_eq!(t.quarantined().count(), 0);
    assert!(!t.purge(later));
}
