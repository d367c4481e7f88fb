//! Metric names and labels as `&'static str`: one `match` per family instead of a name
//! formatted per message (issue 15 #6), with the one list of message labels they share.

use crate::config::ListenKind;

/// A metric label for a listener kind.
pub fn kind_label(k: ListenKind) -> &'static str {
    match k {
        ListenKind::Tls => "tls",
        ListenKind::Mtls => "mtls",
        ListenKind::Tcp => "tcp",
    }
}

/// The method of a request (or `response`), as a static label.
pub fn message_label(bytes: &[u8]) -> &'static str {
    if bytes.starts_with(b"SIP/") {
        return "response";
    }
    let end = bytes.iter().position(|&b| b == b' ').unwrap_or(0);
    sipring_core::Method::from_bytes(&bytes[..end]).label()
}

/// Calls macro `$m` with every label [`message_label`] can return but `other`: the one list
/// the per-label metric names below are built from.
macro_rules! with_message_labels {
    ($m:ident) => {
        $m!(
            "INVITE",
            "ACK",
            "BYE",
            "CANCEL",
            "REGISTER",
            "OPTIONS",
            "MESSAGE",
            "INFO",
            "UPDATE",
            "PRACK",
            "SUBSCRIBE",
            "NOTIFY",
            "REFER",
            "PUBLISH",
            "response"
        )
    };
}

/// `sipring_messages_in_total{kind="<label>"}` without formatting a name per message.
pub fn messages_in_name(label: &'static str) -> &'static str {
    macro_rules! names {
        ($($l:literal),*) => {
            match label {
                $($l => concat!("sipring_messages_in_total{kind=\"", $l, "\"}"),)*
                _ => "sipring_messages_in_total{kind=\"other\"}",
            }
        };
    }
    with_message_labels!(names)
}

/// `sipring_register_total{status="…"}` for a registrar reply, without formatting.
pub fn register_name(code: u16) -> &'static str {
    macro_rules! names {
        ($($c:literal),*) => {
            match code {
                $($c => concat!("sipring_register_total{status=\"", $c, "\"}"),)*
                _ => "sipring_register_total{status=\"other\"}",
            }
        };
    }
    names!(200, 400, 401, 403, 404, 420, 423, 480, 500, 503)
}

/// `sipring_sip_refusals_total{reason="…"}` for a policy refusal label, without formatting.
pub fn refusal_name(label: &'static str) -> &'static str {
    macro_rules! names {
        ($($l:literal),*) => {
            match label {
                $($l => concat!("sipring_sip_refusals_total{reason=\"", $l, "\"}"),)*
                _ => "sipring_sip_refusals_total{reason=\"other\"}",
            }
        };
    }
    names!(
        "auth_malformed",
        "auth_uri_mismatch",
        "auth_algorithm",
        "auth_unknown_user",
        "auth_wrong_password",
        "auth_replay",
        "auth_blocked",
        "register_not_owner",
        "register_foreign_aor",
        "register_aors_per_connection",
        "register_bindings_per_ip",
        "from_not_identity",
        "from_display",
        "identity_params",
        "partner_from_domain",
        "partner_pai_domain",
        "partner_register",
        "node_dialog_without_route",
        "relay_not_allowed",
        "unknown_partner",
        "forged_flow_token",
        "dialog_not_party",
        "register_relay",
        "transactions_full",
        "transactions_per_connection",
        "transactions_per_identity"
    )
}

/// The forward-latency histogram of a message label, likewise.
pub fn forward_name(label: &'static str) -> &'static str {
    macro_rules! names {
        ($($l:literal),*) => {
            match label {
                $($l => concat!("forward_", $l),)*
                _ => "forward_other",
            }
        };
    }
    with_message_labels!(names)
}
