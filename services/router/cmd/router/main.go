// Command router fans accepted impressions out to per-destination subjects,
// parks the traffic of quarantined destinations and replays it on recovery.
package main

import (
	"github.com/bulkhead-io/bulkhead/pkg/service"
	"github.com/bulkhead-io/bulkhead/services/router"
)

func main() { service.Main("router", router.ParseConfig, router.Serve) }
