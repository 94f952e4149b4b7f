module moex.example/moexgo

go 1.19
