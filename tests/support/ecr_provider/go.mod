// ecr-credential-provider, the host pattern the ecr_host rows of
// tests/matching/upstream.toml are checked against. Its registry regex
// lives in package main (cmd/ecr-credential-provider), which Go cannot
// import: hostpattern reads it from this pinned, checksum-verified
// module's source instead of a copy.
module ecr-pull-proxy/tests/support/ecr_provider

go 1.26.0

require k8s.io/cloud-provider-aws v1.37.1 // read as source by hostpattern, never compiled
