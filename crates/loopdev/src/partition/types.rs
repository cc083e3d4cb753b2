//! Names for the well-known partition types of the Discoverable Partitions Specification
//! (uapi-group.org/specifications/specs/discoverable_partitions_specification), so callers can ask for
//! "the ESP" instead of comparing GUIDs. MBR type bytes that mean the same thing get the same name.

use super::guid::Guid;

const GPT_TYPES: &[(&str, &str)] = &[
    ("esp", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
    ("xbootldr", "BC13C2FF-59E6-4262-A352-B275FD6F7172"),
    ("root-x86-64", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
    ("usr-x86-64", "8484680C-9521-48C6-9C11-B0720656F69E"),
    ("root-arm64", "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"),
    ("usr-arm64", "B0E01050-EE5F-4390-949A-9101B17104E9"),
    ("swap", "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"),
    ("home", "933AC7E1-2EB4-4F13-B844-0E14E2AEF915"),
    ("srv", "3B8F8425-20E0-4F3B-907F-1A25A76F98E8"),
    ("linux-generic", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
];

const MBR_TYPES: &[(&str, u8)] = &[("esp", 0xEF), ("xbootldr", 0xEA), ("swap", 0x82), ("linux-generic", 0x83)];

/// The DPS name of a GPT partition type, if it is one of the well-known ones.
pub fn gpt_type_name(g: &Guid) -> Option<&'static str> {
    GPT_TYPES.iter().find(|(_, text)| Guid::parse(text).as_ref() == Some(g)).map(|(name, _)| *name)
}

pub fn mbr_type_name(byte: u8) -> Option<&'static str> {
    MBR_TYPES.iter().find(|(_, b)| *b == byte).map(|(name, _)| *name)
}

/// Every name `gpt_type_name` can give, with its GUID (for bindings that query by name).
pub fn gpt_types() -> impl Iterator<Item = (&'static str, Guid)> {
    GPT_TYPES.iter().map(|(name, text)| (*name, Guid::parse(text).expect("the table holds valid GUIDs")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_guid_parses_and_names_itself() {
        assert_eq!(gpt_types().count(), GPT_TYPES.len());
        for (name, guid) in gpt_types() {
            assert_eq!(gpt_type_name(&guid), Some(name));
        }
        assert_eq!(gpt_type_name(&Guid::ZERO), None);
        assert_eq!(mbr_type_name(0xEF), Some("esp"));
        assert_eq!(mbr_type_name(0x07), None);
    }
}
