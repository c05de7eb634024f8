package deploy

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/bulkhead-io/bulkhead/pkg/stream"
)

func TestDebugEnsure(t *testing.T) {
	urls := startCluster(t, &violationLog{})
	var wg sync.WaitGroup
	for _, u := range []string{"ops", "ops", "ops", "ops"} {
		nc := connect(t, urls, u, nil)
		js, _ := jetstream.New(nc)
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
			defer cancel()
			l := stream.DefaultLimits()
			l.Replicas = 3
			start := time.Now()
			t.Log(u, stream.Ensure(ctx, js, l), time.Since(start))
		}()
	}
	wg.Wait()
}
