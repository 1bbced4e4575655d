//! Validation of the names operators type, shared so that ployzctl rejects a bad
//! name before contacting the daemon and the daemon rejects it again on its own.

/// Checks a network name: 1–63 characters of `[a-z0-9-]`, starting with a
/// letter, not ending with `-` (it becomes part of DNS names and store keys).
/// The error is a sentence saying what is wrong.
pub fn check_network_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!(
            "invalid network name `{name}`: it must be 1 to 63 characters long"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "invalid network name `{name}`: character `{bad}` is not allowed (use a-z, 0-9 and -)"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!(
            "invalid network name `{name}`: it must start with a lowercase letter"
        ));
    }
    if name.ends_with('-') {
        return Err(format!(
            "invalid network name `{name}`: it must not end with `-`"
        ));
    }
    Ok(())
}

/// Checks a namespace as `routes ls` and `deploy` take it: 1–63 characters of
/// `[a-z0-9-]` (it becomes a DNS label and a store key segment).
pub fn check_namespace(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!(
            "invalid namespace `{name}`: it must be 1 to 63 characters long"
        ));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        Some(bad) => Err(format!(
            "invalid namespace `{name}`: character `{bad}` is not allowed (use a-z, 0-9 and -)"
        )),
        None => Ok(()),
    }
}

/// Checks an operation id: 1–64 characters of `[A-Za-z0-9_-]` (a UUID fits).
pub fn check_operation_id(id: &str) -> Result<(), String> {
    let valid = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid operation id `{id}`: use 1-64 letters, digits, `-` or `_`"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_names_follow_dns_label_rules() {
        for good in ["prod", "dev-local", "a", "n1", &"a".repeat(63)] {
            assert!(check_network_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Prod",
            "1abc",
            "-a",
            "a-",
            "a_b",
            "a.b",
            "a b",
            "ünï",
            &"a".repeat(64),
        ] {
            assert!(check_network_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_character_is_named() {
        assert_eq!(
            check_network_name("my_net").expect_err("underscore is invalid"),
            "invalid network name `my_net`: character `_` is not allowed (use a-z, 0-9 and -)"
        );
    }

    #[test]
    fn operation_ids_are_validated() {
        for good in ["a", "0190f3a2-7b1c-7d2e-9f00-aa", "op_1", &"x".repeat(64)] {
            assert!(check_operation_id(good).is_ok(), "{good}");
        }
        for bad in ["", "a.b", "a b", "../x", &"x".repeat(65)] {
            assert!(check_operation_id(bad).is_err(), "{bad}");
        }
    }
}
