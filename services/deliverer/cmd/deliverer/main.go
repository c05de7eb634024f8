// Command deliverer POSTs routed impressions to webhook destinations: batched,
// signed, retried without holding a worker, and parked when undeliverable.
package main

import (
	"github.com/bulkhead-io/bulkhead/pkg/service"
	"github.com/bulkhead-io/bulkhead/services/deliverer"
)

func main() { service.Main("deliverer", deliverer.ParseConfig, deliverer.Serve) }
