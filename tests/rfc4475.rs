//! RFC 4475 torture tests: every message of the corpus goes through sipring's parser, its
//! validation and its proxy/registrar decisions, and gets what the RFC expects of a proxy and
//! registrar (sipring's roles). Where the RFC leaves a choice, the comment says which one
//! sipring makes.

use sipring_core::registrar::BindingStore;
use sipring_core::{
    Framer, Framing, Header, HeaderName, KeepaliveRole, Limits, Method, NameAddr, ParseError,
    Status, parse,
};
use sipring_tests::{Outcome, Pipeline, corpus, corpus_dir};
use std::time::Instant;

fn expected(file: &str) -> Outcome {
    use Outcome::*;
    let aor = |s: &str| Lookup(s.to_string());
    match file {
        // 3.1.1 valid messages: parse, then normal handling.
        "wsinv.dat" => Respond(403), // foreign domain chair-dnrc.example.com, no peer route
        "intmeth.dat" => aor("sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*@example.com"),
        "esc01.dat" => ToPeer("net-partner".into()), // Request-URI host example.net
        "escnull.dat" => Respond(200),               // registers two distinct contacts
        "esc02.dat" => Respond(403), // RE%47IST%45R is not REGISTER; registrar.example.com not served
        "lwsdisp.dat" => aor("sip:user@example.com"),
        // Parses (see below), but its top Via has no branch: sipring keeps no RFC 2543
        // transaction matching (the §3.4 choice), so the proxy answers 400.
        "longreq.dat" => Respond(400),
        "dblreq.dat" => Respond(200), // the REGISTER; trailing octets discarded
        "semiuri.dat" => aor("sip:user;par=u%40example.net@example.com"),
        "transports.dat" => aor("sip:user@example.com"),
        "mpart01.dat" => Respond(403), // example.org is neither ours nor a peer's
        "unreason.dat" | "noreason.dat" => Drop, // responses whose top Via is not ours
        // 3.1.2 invalid messages.
        "badinv01.dat" => Respond(400),
        "clerr.dat" => Respond(400), // datagram shorter than Content-Length (stream: see below)
        "ncl.dat" => Respond(400),
        "scalar02.dat" => Respond(400),
        "scalarlg.dat" => Drop,
        "quotbal.dat" => Respond(400),
        "ltgtruri.dat" => Respond(400),
        "lwsruri.dat" => Respond(400),
        "lwsstart.dat" => Respond(400), // the strict choice: reject
        "trws.dat" => Respond(400),     // the strict choice: reject
        "escruri.dat" => Respond(400),  // escaped headers in a Request-URI: reject
        "baddate.dat" => aor("sip:user@example.com"), // Date is not interpreted; passed on
        "regbadct.dat" => Respond(400),
        "badaspec.dat" => Respond(400),
        "baddn.dat" => Respond(400),
        "badvers.dat" => Respond(505),
        "mismatch01.dat" => Respond(400),
        "mismatch02.dat" => Respond(400), // 501 or 400; a proxy cannot know the method
        "bigcode.dat" => Drop,
        // 3.2 transaction layer.
        "badbranch.dat" => Respond(400),
        // 3.3 application layer.
        "insuf.dat" => Respond(400),
        "unkscm.dat" => Respond(416),
        "novelsc.dat" => Respond(416),
        "unksm2.dat" => Respond(400), // registrar: To must be a SIP AOR
        "bext01.dat" => Respond(420), // proxy role: Proxy-Require
        "invut.dat" => aor("sip:user@example.com"), // a proxy forwards unknown Content-Type
        "regaut01.dat" => Respond(200), // unknown Authorization scheme ignored
        "multi01.dat" => Respond(400),
        "mcl01.dat" => Respond(400),
        "bcast.dat" => Drop,
        "zeromf.dat" => Respond(483),
        "cparam01.dat" | "cparam02.dat" | "regescrt.dat" => Respond(200),
        "sdp01.dat" => aor("sip:user@example.com"), // Accept is the UAS's business; proxied
        // 3.4: RFC 2543 compatibility is not kept (no branch): rejected.
        "inv2543.dat" => Respond(400),
        other => panic!("no expectation for {other}"),
    }
}

fn read(file: &str) -> Vec<u8> {
    std::fs::read(corpus_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn every_corpus_message_gets_the_expected_handling() {
    let entries = corpus();
    assert_eq!(
        entries.len(),
        49,
        "manifest lists the 49 messages of RFC 4475 §3"
    );
    let mut failures = Vec::new();
    for e in &entries {
        let bytes = read(&e.file);
        assert_eq!(
            bytes.len(),
            e.size,
            "{} size differs from the manifest",
            e.file
        );
        let mut p = Pipeline::default();
        let got = p.process(&bytes, Instant::now());
        let want = expected(&e.file);
        if got != want {
            failures.push(format!(
                "{} (§{}, {}): got {got:?}, want {want:?}",
                e.file, e.section, e.class
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Parses a corpus message as a datagram and hands it to `f` with its essentials.
fn with_valid(
    file: &str,
    f: impl FnOnce(&sipring_core::Message<'_, '_>, &sipring_core::Essentials<'_>),
) {
    let bytes = read(file);
    let mut h = [Header::EMPTY; 64];
    let Ok(Status::Complete(m)) = parse(&bytes, &mut h, &Limits::default(), Framing::Datagram)
    else {
        panic!("{file} did not parse")
    };
    let e = m
        .validate(&Limits::default())
        .unwrap_or_else(|err| panic!("{file}: {err}"));
    f(&m, &e);
}

#[test]
fn valid_messages_parse_to_the_right_values() {
    with_valid("wsinv.dat", |m, e| {
        assert_eq!(m.method(), Some(Method::Invite));
        assert_eq!(e.to.tag(), Some(&b"1918181833n"[..]));
        assert_eq!(e.from.tag(), Some(&b"98asjd8"[..]));
        assert_eq!(e.max_forwards, Some(68));
        assert_eq!((e.cseq.seq, e.cseq.method), (9, &b"INVITE"[..]));
        assert_eq!(e.top_via.host, b"192.0.2.2");
        assert_eq!(e.top_via.transport, b"UDP");
        assert_eq!(
            m.header_raw("NewFangledHeader").unwrap().value,
            b"newfangled value\r\n continued newfangled value"
        );
        assert_eq!(m.body().len(), 150);
        assert_eq!(m.header(HeaderName::Subject).unwrap().value, b"");
    });
    with_valid("intmeth.dat", |m, e| {
        assert_eq!(
            m.method(),
            Some(Method::Other(
                b"!interesting-Method0123456789_*+`.%indeed'~"
            ))
        );
        assert_eq!(e.cseq.seq, 139122385);
        assert_eq!(e.call_id, b"intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{");
        let to = e.to.uri();
        assert_eq!(
            to.user,
            Some(&b"1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"[..])
        );
        assert_eq!(e.top_via.branch(), Some(&b"z9hG4bK-.!%66*_+`'~"[..]));
    });
    with_valid("esc01.dat", |m, e| {
        assert_eq!(&*e.to.uri().user_unescaped().unwrap(), b"user");
        assert_eq!(&*e.from.uri().user_unescaped().unwrap(), b"I have spaces");
        let contact = NameAddr::parse(m.header(HeaderName::Contact).unwrap().value).unwrap();
        // value%41 stays distinct from valueA: no recursive unescaping.
        assert_eq!(contact.uri().params, b";%6C%72;n%61me=v%61lue%25%34%31");
    });
    with_valid("escnull.dat", |m, _| {
        let contacts: Vec<_> = m
            .values(HeaderName::Contact)
            .iter()
            .map(|v| {
                NameAddr::parse(v.value)
                    .unwrap()
                    .uri()
                    .user_unescaped()
                    .unwrap()
                    .into_owned()
            })
            .collect();
        assert_eq!(contacts, vec![b"\0".to_vec(), b"\0\0".to_vec()]);
    });
    with_valid("lwsdisp.dat", |_, e| {
        assert_eq!(e.from.display, Some(&b"caller"[..]))
    });
    with_valid("longreq.dat", |_, e| {
        assert!(e.to.display.unwrap().len() > 90);
        assert!(e.call_id.len() > 100);
        assert!(e.from.tag().unwrap().len() > 100);
    });
    with_valid("dblreq.dat", |m, _| {
        assert_eq!(m.method(), Some(Method::Register));
        assert!(
            m.len() < read("dblreq.dat").len(),
            "trailing INVITE is not part of the message"
        );
        assert!(m.body().is_empty());
    });
    with_valid("semiuri.dat", |m, _| {
        let u = sipring_core::Uri::parse(m.request_uri().unwrap()).unwrap();
        assert_eq!(u.user, Some(&b"user;par=u%40example.net"[..]));
        assert_eq!(u.host, b"example.com");
    });
    with_valid("transports.dat", |m, e| {
        assert_eq!(e.via_count, 5);
        let t: Vec<_> = m
            .values(HeaderName::Via)
            .iter()
            .map(|v| {
                sipring_core::Via::parse(v.value)
                    .unwrap()
                    .transport
                    .to_vec()
            })
            .collect();
        assert_eq!(t, [&b"UDP"[..], b"SCTP", b"TLS", b"UNKNOWN", b"TCP"]);
    });
    with_valid("mpart01.dat", |m, _| {
        assert_eq!(m.body().len(), m.content_length().unwrap());
        assert!(m.body().contains(&0));
    });
    with_valid("unreason.dat", |m, _| {
        assert_eq!(m.status(), Some(200));
        let sipring_core::StartLine::Response { reason, .. } = m.start_line() else {
            panic!()
        };
        assert!(!std::str::from_utf8(reason).unwrap().is_ascii());
    });
    with_valid("noreason.dat", |m, _| {
        let sipring_core::StartLine::Response { code, reason } = m.start_line() else {
            panic!()
        };
        assert_eq!((*code, *reason), (100, &b""[..]));
    });
}

#[test]
fn invalid_messages_fail_for_the_right_reason() {
    let err = |file: &str| {
        let bytes = read(file);
        let mut h = [Header::EMPTY; 64];
        match parse(&bytes, &mut h, &Limits::default(), Framing::Datagram) {
            Ok(Status::Complete(m)) => m.validate(&Limits::default()).err(),
            Ok(Status::Partial) => unreachable!(),
            Err(e) => Some(e),
        }
    };
    assert_eq!(
        err("badinv01.dat"),
        Some(ParseError::InvalidHeader(HeaderName::Via))
    );
    assert_eq!(err("ncl.dat"), Some(ParseError::InvalidContentLength));
    assert_eq!(err("mcl01.dat"), Some(ParseError::InvalidContentLength));
    assert_eq!(
        err("scalar02.dat"),
        Some(ParseError::InvalidHeader(HeaderName::CSeq))
    );
    assert_eq!(
        err("scalarlg.dat"),
        Some(ParseError::InvalidHeader(HeaderName::CSeq))
    );
    assert_eq!(
        err("quotbal.dat"),
        Some(ParseError::InvalidHeader(HeaderName::To))
    );
    assert_eq!(err("ltgtruri.dat"), Some(ParseError::InvalidStartLine));
    assert_eq!(err("lwsruri.dat"), Some(ParseError::InvalidStartLine));
    assert_eq!(err("escruri.dat"), Some(ParseError::InvalidRequestUri));
    // regbadct: the message itself is well-formed; its Contact is the registrar's to refuse
    // (400, checked by the corpus outcome test).
    assert_eq!(err("regbadct.dat"), None);
    assert_eq!(err("baddn.dat"), Some(ParseError::Truncated));
    assert_eq!(err("badvers.dat"), Some(ParseError::UnsupportedVersion));
    assert_eq!(err("mismatch01.dat"), Some(ParseError::CSeqMethodMismatch));
    assert_eq!(err("bigcode.dat"), Some(ParseError::InvalidStatusCode));
    assert_eq!(
        err("insuf.dat"),
        Some(ParseError::MissingHeader(HeaderName::CallId))
    );
    assert_eq!(
        err("multi01.dat"),
        Some(ParseError::DuplicateHeader(HeaderName::CSeq))
    );
    // Framing errors on a stream close the connection.
    assert!(ParseError::InvalidContentLength.closes_connection());
}

#[test]
fn stream_transport_behaviour() {
    // clerr: on a stream, a Content-Length larger than what arrived means "wait".
    let bytes = read("clerr.dat");
    let mut f = Framer::new(Limits::default(), KeepaliveRole::Server);
    assert_eq!(f.frame(&bytes), Ok(Status::Partial));
    // ncl / mcl01: framing is lost, the connection must close.
    for file in ["ncl.dat", "mcl01.dat"] {
        let mut f = Framer::new(Limits::default(), KeepaliveRole::Server);
        let e = f.frame(&read(file)).unwrap_err();
        assert!(e.closes_connection(), "{file}: {e}");
    }
    // inv2543 has no Content-Length: not frameable on a stream.
    let mut f = Framer::new(Limits::default(), KeepaliveRole::Server);
    assert_eq!(
        f.frame(&read("inv2543.dat")),
        Err(ParseError::MissingContentLength)
    );
    // dblreq on a stream: the REGISTER is one frame; what follows is the next frame.
    let bytes = read("dblreq.dat");
    let mut f = Framer::new(Limits::default(), KeepaliveRole::Server);
    let Ok(Status::Complete(first)) = f.frame(&bytes) else {
        panic!()
    };
    assert!(bytes[first.len()..].starts_with(b"\r\n"));
}

#[test]
fn registrations_keep_contact_and_uri_parameters_apart() {
    let now = Instant::now();
    let contact = |file: &str| {
        let mut p = Pipeline::default();
        assert_eq!(p.process(&read(file), now), Outcome::Respond(200), "{file}");
        let aor = match file {
            "cparam01.dat" | "cparam02.dat" => "sip:watson@example.com",
            "escnull.dat" => "sip:null-%00-null@example.com",
            _ => "sip:user@example.com",
        };
        p.store
            .get(aor)
            .iter()
            .map(|b| b.contact.clone())
            .collect::<Vec<_>>()
    };
    // cparam01: unknownparam is a contact parameter, never a URI parameter of the binding.
    assert_eq!(
        contact("cparam01.dat"),
        ["sip:+19725552222@gw1.example.net"]
    );
    // cparam02: inside <> it is a URI parameter and stays on the binding.
    assert_eq!(
        contact("cparam02.dat"),
        ["sip:+19725552222@gw1.example.net;unknownparam"]
    );
    // regescrt: the escaped Route header stays inside the contact URI.
    assert_eq!(
        contact("regescrt.dat"),
        ["sip:user@example.com?Route=%3Csip:sip.example.com%3E"]
    );
    // escnull: two distinct contacts.
    assert_eq!(contact("escnull.dat").len(), 2);
}
