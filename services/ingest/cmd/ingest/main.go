// Command ingest serves bulkhead.ingest.v1.IngestService: it authenticates
// callers and stores their impressions in JetStream.
package main

import (
	"github.com/bulkhead-io/bulkhead/pkg/service"
	"github.com/bulkhead-io/bulkhead/services/ingest"
)

func main() { service.Main("ingest", ingest.ParseConfig, ingest.Serve) }
