//! The one place where module errors become CNI error codes (to be implemented).
