"""Process isolation: a silo (namespaces, root filesystem, hardening) around a job."""
